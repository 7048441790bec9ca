// Packed integer and 16-entry codebook weights (the templates; packed_int.cpp and codebook.cpp
// instantiate them): y = x W^T with
//    W[o, i] = s[o, g] * v(q[o, i]) - sz[o, g], v(q) = q or codebook[q], g = i / gi.
//    A block of 32 codes is stored as bit planes of width 8, 4, 2, 1 (4*w bytes each);
//    byte j of a w-plane holds, in field k, the code at position j + k*4w.
#pragma once
#include "common.h"

namespace shrink {

inline void unpack32_scalar(const uint8_t* p, int bits, uint8_t* q) {
  std::memset(q, 0, 32);
  for (int rem = bits, shift = 0; rem > 0;) {
    int w = plane_width(rem), nb = 4 * w, mask = (1 << w) - 1;
    for (int j = 0; j < nb; ++j)
      for (int k = 0; k < 8 / w; ++k) q[j + k * nb] |= ((p[j] >> (k * w)) & mask) << shift;
    p += nb; shift += w; rem -= w;
  }
}

using QRowFn = void (*)(const float*, int, int, const uint8_t*, const f16*, const f16*, const float*,
                        int, int, const float*, float*, int, int);

template <int BITS, bool CB>
void qrow_scalar(const float* x, int M, int Kp, const uint8_t* pk, const f16* s, const f16* sz,
                 const float* xs, int G, int gi, const float* cb, float* y, int N, int o) {
  uint8_t q[32];
  for (int m = 0; m < M; ++m) {
    const float* xm = x + (int64_t)m * Kp;
    float acc = 0.f;
    for (int g = 0; g < G; ++g) {
      float d = 0.f;
      for (int k = g * gi; k < (g + 1) * gi; k += 32) {
        unpack32_scalar(pk + (int64_t)k / 32 * 4 * BITS, BITS, q);
        for (int j = 0; j < 32; ++j) d += xm[k + j] * (CB ? cb[q[j]] : (float)q[j]);
      }
      acc += h2f(s[g]) * d - h2f(sz[g]) * xs[m * G + g];
    }
    y[(int64_t)m * N + o] = acc;
  }
}

template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline __m256i unpack32_avx2(const uint8_t* p) {
  __m256i q = _mm256_setzero_si256();
  int shift = 0;
  for (int rem = BITS; rem > 0;) {
    int w = plane_width(rem);
    __m256i v;
    if (w == 8) {
      v = _mm256_loadu_si256((const __m256i*)p);
    } else if (w == 4) {
      __m128i a = _mm_loadu_si128((const __m128i*)p);
      v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(a, 4), a), _mm256_set1_epi8(0x0F));
    } else if (w == 2) {
      int64_t u; std::memcpy(&u, p, 8);
      v = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(u), _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(3));
    } else {
      int32_t u; std::memcpy(&u, p, 4);
      v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(u), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), _mm256_set1_epi8(1));
    }
    q = _mm256_or_si256(q, shift ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(shift)) : v);
    p += 4 * w; shift += w; rem -= w;
  }
  return q;
}

template <bool CB>
__attribute__((target("avx2,fma,f16c"))) inline __m256 to_float8(__m128i b8, __m256 cblo, __m256 cbhi) {
  __m256i i = _mm256_cvtepu8_epi32(b8);
  if (!CB) return _mm256_cvtepi32_ps(i);
  __m256 lo = _mm256_permutevar8x32_ps(cblo, i), hi = _mm256_permutevar8x32_ps(cbhi, i);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}

// MB rows of x at once, accumulators in registers (MB is a compile-time constant).
template <int BITS, bool CB, int MB>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void qblock_avx2(
    const float* x, int Kp, const uint8_t* pk, const f16* s, const f16* sz, const float* xs, int G, int gi,
    __m256 cblo, __m256 cbhi, float* y, int N) {
  __m256 Y[MB], A[MB][2];
  for (int m = 0; m < MB; ++m) Y[m] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    for (int m = 0; m < MB; ++m) A[m][0] = A[m][1] = _mm256_setzero_ps();
    for (int k = g * gi; k < (g + 1) * gi; k += 32) {
      __m256i q = unpack32_avx2<BITS>(pk + (int64_t)k / 32 * 4 * BITS);
      __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      __m256 w[4] = {to_float8<CB>(lo, cblo, cbhi), to_float8<CB>(_mm_srli_si128(lo, 8), cblo, cbhi),
                     to_float8<CB>(hi, cblo, cbhi), to_float8<CB>(_mm_srli_si128(hi, 8), cblo, cbhi)};
      for (int m = 0; m < MB; ++m)
        for (int c = 0; c < 4; ++c) A[m][c & 1] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(x + (int64_t)m * Kp + k + 8 * c), A[m][c & 1]);
    }
    __m256 sg = _mm256_set1_ps(h2f_v(s[g]));
    for (int m = 0; m < MB; ++m) Y[m] = _mm256_fmadd_ps(sg, _mm256_add_ps(A[m][0], A[m][1]), Y[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float bias = 0.f;
    for (int g = 0; g < G; ++g) bias += h2f_v(sz[g]) * xs[m * G + g];
    y[(int64_t)m * N] = hsum(Y[m]) - bias;
  }
}

template <int BITS, bool CB>
__attribute__((target("avx2,fma,f16c"))) void qrow_avx2(const float* x, int M, int Kp, const uint8_t* pk,
                                                        const f16* s, const f16* sz, const float* xs, int G,
                                                        int gi, const float* cb, float* y, int N, int o) {
  __m256 cblo = _mm256_setzero_ps(), cbhi = cblo;
  if (CB) { cblo = _mm256_loadu_ps(cb); cbhi = _mm256_loadu_ps(cb + 8); }
  int m = 0;
  for (; m + 4 <= M; m += 4)
    qblock_avx2<BITS, CB, 4>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cblo, cbhi, y + (int64_t)m * N + o, N);
  for (; m < M; ++m)
    qblock_avx2<BITS, CB, 1>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cblo, cbhi, y + (int64_t)m * N + o, N);
}

template <bool CB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) inline __m512 to_float16(__m128i b16, __m512 cb) {
  __m512i i = _mm512_cvtepu8_epi32(b16);
  return CB ? _mm512_permutexvar_ps(i, cb) : _mm512_cvtepi32_ps(i);
}

// The AVX-512 variant: 16 codes per conversion and FMA.
template <int BITS, bool CB, int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"), always_inline)) inline void qblock_avx512(
    const float* x, int Kp, const uint8_t* pk, const f16* s, const f16* sz, const float* xs, int G, int gi,
    __m512 cbv, float* y, int N) {
  __m512 Y[MB], A[MB][2];
  for (int m = 0; m < MB; ++m) Y[m] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    for (int m = 0; m < MB; ++m) A[m][0] = A[m][1] = _mm512_setzero_ps();
    for (int k = g * gi; k < (g + 1) * gi; k += 32) {
      __m256i q = unpack32_avx2<BITS>(pk + (int64_t)k / 32 * 4 * BITS);
      __m512 w0 = to_float16<CB>(_mm256_castsi256_si128(q), cbv), w1 = to_float16<CB>(_mm256_extracti128_si256(q, 1), cbv);
      for (int m = 0; m < MB; ++m) {
        A[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (int64_t)m * Kp + k), A[m][0]);
        A[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + (int64_t)m * Kp + k + 16), A[m][1]);
      }
    }
    __m512 sg = _mm512_set1_ps(h2f_v(s[g]));
    for (int m = 0; m < MB; ++m) Y[m] = _mm512_fmadd_ps(sg, _mm512_add_ps(A[m][0], A[m][1]), Y[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float bias = 0.f;
    for (int g = 0; g < G; ++g) bias += h2f_v(sz[g]) * xs[m * G + g];
    y[(int64_t)m * N] = _mm512_reduce_add_ps(Y[m]) - bias;
  }
}

template <int BITS, bool CB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void qrow_avx512(
    const float* x, int M, int Kp, const uint8_t* pk, const f16* s, const f16* sz, const float* xs, int G,
    int gi, const float* cb, float* y, int N, int o) {
  const __m512 cbv = CB ? _mm512_loadu_ps(cb) : _mm512_setzero_ps();
  int m = 0;
  for (; m + 8 <= M; m += 8)  // 8 rows per weight conversion: 16 + 8 accumulators of the 32 registers
    qblock_avx512<BITS, CB, 8>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cbv, y + (int64_t)m * N + o, N);
  for (; m + 4 <= M; m += 4)
    qblock_avx512<BITS, CB, 4>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cbv, y + (int64_t)m * N + o, N);
  for (; m < M; ++m)
    qblock_avx512<BITS, CB, 1>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cbv, y + (int64_t)m * N + o, N);
}


template <int BITS, bool CB>
QRowFn pick_qrow(int lvl) {
  return lvl >= AVX512 ? qrow_avx512<BITS, CB> : lvl >= AVX2 ? qrow_avx2<BITS, CB> : qrow_scalar<BITS, CB>;
}

// float GEMM beats any GEMV.
using DqFn = void (*)(const uint8_t*, const f16*, const f16*, int, int, const float*, float*);

template <int BITS, bool CB>
void dq_row_scalar(const uint8_t* pk, const f16* s, const f16* sz, int G, int gi, const float* cb, float* w) {
  uint8_t q[32];
  for (int k = 0; k < G * gi; k += 32) {
    unpack32_scalar(pk + k / 32 * 4 * BITS, BITS, q);
    const float sk = h2f(s[k / gi]), zk = h2f(sz[k / gi]);
    for (int j = 0; j < 32; ++j) w[k + j] = sk * (CB ? cb[q[j]] : (float)q[j]) - zk;
  }
}

template <int BITS, bool CB>
__attribute__((target("avx2,fma,f16c"))) void dq_row_avx2(const uint8_t* pk, const f16* s, const f16* sz, int G,
                                                          int gi, const float* cb, float* w) {
  __m256 cblo = _mm256_setzero_ps(), cbhi = cblo;
  if (CB) { cblo = _mm256_loadu_ps(cb); cbhi = _mm256_loadu_ps(cb + 8); }
  for (int k = 0; k < G * gi; k += 32) {
    __m256i q = unpack32_avx2<BITS>(pk + k / 32 * 4 * BITS);
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m256 sv = _mm256_set1_ps(h2f_v(s[k / gi])), zv = _mm256_set1_ps(h2f_v(sz[k / gi]));
    _mm256_storeu_ps(w + k, _mm256_fmsub_ps(sv, to_float8<CB>(lo, cblo, cbhi), zv));
    _mm256_storeu_ps(w + k + 8, _mm256_fmsub_ps(sv, to_float8<CB>(_mm_srli_si128(lo, 8), cblo, cbhi), zv));
    _mm256_storeu_ps(w + k + 16, _mm256_fmsub_ps(sv, to_float8<CB>(hi, cblo, cbhi), zv));
    _mm256_storeu_ps(w + k + 24, _mm256_fmsub_ps(sv, to_float8<CB>(_mm_srli_si128(hi, 8), cblo, cbhi), zv));
  }
}


// The AVX-512 variant: 16 weights per conversion and store (the same fma per weight: bit-identical).
template <int BITS, bool CB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void dq_row_avx512(
    const uint8_t* pk, const f16* s, const f16* sz, int G, int gi, const float* cb, float* w) {
  const __m512 cbv = CB ? _mm512_loadu_ps(cb) : _mm512_setzero_ps();
  for (int k = 0; k < G * gi; k += 32) {
    const __m256i q = unpack32_avx2<BITS>(pk + k / 32 * 4 * BITS);
    const __m512 sv = _mm512_set1_ps(h2f_v(s[k / gi])), zv = _mm512_set1_ps(h2f_v(sz[k / gi]));
    _mm512_storeu_ps(w + k, _mm512_fmsub_ps(sv, to_float16<CB>(_mm256_castsi256_si128(q), cbv), zv));
    _mm512_storeu_ps(w + k + 16, _mm512_fmsub_ps(sv, to_float16<CB>(_mm256_extracti128_si256(q, 1), cbv), zv));
  }
}

template <int BITS, bool CB>
DqFn pick_dq(int lvl) {
  return lvl >= AVX512 ? dq_row_avx512<BITS, CB> : lvl >= AVX2 ? dq_row_avx2<BITS, CB> : dq_row_scalar<BITS, CB>;
}

QRowFn codebook_qrow_fn(int lvl);  // codebook.cpp
DqFn codebook_dq_fn(int lvl);

}  // namespace shrink
