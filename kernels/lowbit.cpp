// Low-bit CPU kernels of the shrink suite, bound as torch.ops.shrink.*.
//
// Every kernel has an AVX2/FMA/F16C path (and AVX-512 for the packed-int matmul and, with VNNI, the int8 GEMM)
// compiled with per-function target attributes, and a portable scalar path; the path is chosen at run
// time from the CPU's features (and can be forced lower for tests). Rows of the output are
// split over OpenMP threads. The layouts are made by shrinklib/kernels/pack.py, which also
// documents them; shrinklib/kernels/reference.py computes the same functions in PyTorch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

enum { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
int g_max = -1, g_level = -1;

int max_level() {
  if (g_max < 0) {
    __builtin_cpu_init();
    g_max = SCALAR;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) g_max = AVX2;
    if (g_max == AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      g_max = AVX512;
    g_level = g_max;
  }
  return g_max;
}
int level() { max_level(); return g_level; }

int64_t simd_level() { return level(); }
int64_t simd_max_level() { return max_level(); }
int64_t set_simd_level(int64_t l) {
  TORCH_CHECK(l >= 0 && l <= max_level(), "SIMD level ", l, " is not available on this CPU (max ", max_level(), ")");
  g_level = (int)l;
  return g_level;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dt, int dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// x (..., K) float32 on the CPU as contiguous rows (M, K), and the shape (..., N) of the output.
at::Tensor rows_of(const at::Tensor& x, int64_t N, std::vector<int64_t>& out_shape) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be ", at::kFloat, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension");
  out_shape.assign(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return x.reshape({-1, x.size(-1)}).contiguous();
}

// Plane widths of a `bits`-bit code, low bits first: 3 -> {2, 1}, 7 -> {4, 2, 1}.
inline int plane_width(int rem) { return rem >= 8 ? 8 : rem >= 4 ? 4 : rem >= 2 ? 2 : 1; }

// Scales and s*z are stored in float16, as GPTQ/AWQ checkpoints and llama.cpp's Q4_1 store them:
// at group size 64 that is 0.5 bit per weight instead of 1. The portable paths convert with c10's
// software routine, the SIMD paths with F16C (present on every AVX2 CPU, and checked).
using f16 = at::Half;
inline float h2f(f16 h) { return static_cast<float>(h); }
__attribute__((target("avx2,fma,f16c"))) inline float h2f_v(f16 h) { return _cvtsh_ss(h.x); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8h(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

// ---------------------------------------------------------------------------------------
// 1. Packed integer (and 16-entry codebook) matmul: y = x W^T with
//    W[o, i] = s[o, g] * v(q[o, i]) - sz[o, g], v(q) = q or codebook[q], g = i / gi.
//    A block of 32 codes is stored as bit planes of width 8, 4, 2, 1 (4*w bytes each);
//    byte j of a w-plane holds, in field k, the code at position j + k*4w.
// ---------------------------------------------------------------------------------------
void unpack32_scalar(const uint8_t* p, int bits, uint8_t* q) {
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

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
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
  for (; m + 4 <= M; m += 4)
    qblock_avx512<BITS, CB, 4>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cbv, y + (int64_t)m * N + o, N);
  for (; m < M; ++m)
    qblock_avx512<BITS, CB, 1>(x + (int64_t)m * Kp, Kp, pk, s, sz, xs + m * G, G, gi, cbv, y + (int64_t)m * N + o, N);
}

template <int BITS, bool CB>
QRowFn pick_qrow(int lvl) {
  return lvl >= AVX512 ? qrow_avx512<BITS, CB> : lvl >= AVX2 ? qrow_avx2<BITS, CB> : qrow_scalar<BITS, CB>;
}

QRowFn qrow_fn(int bits, bool cb, int lvl) {
  if (cb) return pick_qrow<4, true>(lvl);
  switch (bits) {
    case 2: return pick_qrow<2, false>(lvl);
    case 3: return pick_qrow<3, false>(lvl);
    case 4: return pick_qrow<4, false>(lvl);
    case 8: return pick_qrow<8, false>(lvl);
  }
  TORCH_CHECK(false, "qmatmul supports bits 2, 3, 4, 8; got ", bits);
}

void check_qargs(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                 const at::Tensor& codebook, int64_t bits, int64_t gi) {
  check(packed, "packed", at::kByte, 2);
  check(scales, "scales", at::kHalf, 2);
  check(szeros, "szeros", at::kHalf, 2);
  TORCH_CHECK(gi > 0 && gi % 32 == 0, "group size must be a positive multiple of 32, got ", gi);
  TORCH_CHECK(scales.sizes() == szeros.sizes() && scales.size(0) == packed.size(0), "scales/szeros must be (out, groups)");
  TORCH_CHECK(packed.size(1) == scales.size(1) * gi / 8 * bits, "packed has ", packed.size(1),
              " bytes per row, expected groups*group_size*bits/8 = ", scales.size(1) * gi / 8 * bits);
  if (codebook.numel()) {
    check(codebook, "codebook", at::kFloat, 1);
    TORCH_CHECK(codebook.numel() == 16 && bits == 4, "a codebook has 16 entries and 4-bit codes");
  }
}

// x (..., K) float32 -> y (..., N).
at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& szeros, const at::Tensor& codebook, int64_t bits, int64_t gi) {
  check_qargs(packed, scales, szeros, codebook, bits, gi);
  std::vector<int64_t> out_shape;
  const at::Tensor x = rows_of(x_in, packed.size(0), out_shape);
  const int M = x.size(0), K = x.size(1), N = packed.size(0), G = scales.size(1), Kp = G * gi;
  TORCH_CHECK(K <= Kp && K > Kp - gi, "x has ", K, " features; the packed weight has ", G, " groups of ", gi);
  at::Tensor xp = K == Kp ? x : at::constant_pad_nd(x, {0, Kp - K});
  at::Tensor xs = xp.view({M, G, gi}).sum(2).contiguous();  // (M, G) sums of x per group
  at::Tensor y = at::empty({M, N}, x.options());
  QRowFn fn = qrow_fn(bits, codebook.numel() > 0, level());
  const float* px = xp.data_ptr<float>();
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  const float* pcb = codebook.numel() ? codebook.data_ptr<float>() : nullptr;
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const int64_t rb = packed.size(1);
  float *py = y.data_ptr<float>(), *pxs = xs.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) fn(px, M, Kp, pk + o * rb, ps + o * G, psz + o * G, pxs, G, gi, pcb, py, N, o);
  });
  return y.view(out_shape);
}

// Dequantize the packed weight to float32 (out, in): for large batches (prefill) where a
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

template <int BITS, bool CB>
DqFn pick_dq(int lvl) { return lvl >= AVX2 ? dq_row_avx2<BITS, CB> : dq_row_scalar<BITS, CB>; }

DqFn dq_fn(int bits, bool cb, int lvl) {
  if (cb) return pick_dq<4, true>(lvl);
  switch (bits) {
    case 2: return pick_dq<2, false>(lvl);
    case 3: return pick_dq<3, false>(lvl);
    case 4: return pick_dq<4, false>(lvl);
    case 8: return pick_dq<8, false>(lvl);
  }
  TORCH_CHECK(false, "qdequant supports bits 2, 3, 4, 8; got ", bits);
}

at::Tensor qdequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                    const at::Tensor& codebook, int64_t bits, int64_t gi, int64_t K) {
  check_qargs(packed, scales, szeros, codebook, bits, gi);
  const int N = packed.size(0), G = scales.size(1), Kp = G * gi;
  TORCH_CHECK(K <= Kp && K > Kp - gi, "in_features ", K, " does not match ", G, " groups of ", gi);
  at::Tensor W = at::empty({N, Kp}, scales.options().dtype(at::kFloat));
  DqFn fn = dq_fn(bits, codebook.numel() > 0, level());
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  const float* pcb = codebook.numel() ? codebook.data_ptr<float>() : nullptr;
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  float* pw = W.data_ptr<float>();
  const int64_t rb = packed.size(1);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) fn(pk + o * rb, ps + o * G, psz + o * G, G, gi, pcb, pw + o * Kp);
  });
  return K == Kp ? W : W.narrow(1, 0, K).contiguous();
}

// ---------------------------------------------------------------------------------------
// 2. T-MAC lookup-table GEMV for 1-4 bit weights.
//    Activations: for each 4 inputs t, a 16-entry table T_t[idx] = sum_k bit_k(idx) x[4t+k],
//    quantized to int8 with one scale per chunk of <= 64 inputs and stored biased (+128) as
//    uint8 so that vpshufb looks up 32 rows at once. Weights: bit planes; for a tile of 32
//    rows, per (chunk, plane b, pair of tables t, t+1) 32 bytes: byte r = idx_b[r][t] |
//    idx_b[r][t+1] << 4. Accumulation is exact in integers within a chunk, then
//    y[o] += s[o, g] * ls[c] * sum_b 2^b acc_b[o]; finally y[o] -= sum_g sz[o, g] xs[g].
//    Scales are stored per tile in the order the SIMD lanes produce the rows:
//    rows 0,2,..,14 | 16,18,..,30 | 1,3,..,15 | 17,..,31 (see pack.py).
// ---------------------------------------------------------------------------------------
const int LUT_PERM[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                          1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

// The 16 biased entries of tables t0..t1-1 (scale inv): portable, and AVX2 over the 16 entries with
// T[j] = (((0 + a0) + a1) + a2) + a3, a_k = bit_k(j) ? x_k : 0: adding an exact 0 changes nothing, so
// the sums (and the rounding, nearest-even as nearbyint) are those of the portable loop.
using TabFn = void (*)(const float*, int, int, float, uint8_t*);

void tables_scalar(const float* x, int t0, int t1, float inv, uint8_t* tab) {
  float T[16];
  for (int t = t0; t < t1; ++t) {
    T[0] = 0.f;
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < (1 << k); ++j) T[(1 << k) + j] = T[j] + x[4 * t + k];
    for (int j = 0; j < 16; ++j) tab[t * 16 + j] = (uint8_t)(std::nearbyint(T[j] * inv) + 128.0f);
  }
}

__attribute__((target("avx2,fma,f16c"))) void tables_avx2(const float* x, int t0, int t1, float inv, uint8_t* tab) {
  const __m256i j = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 m[3];  // lanes j whose bit k is set, k < 3; bit 3 splits the two halves
  for (int k = 0; k < 3; ++k)
    m[k] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(j, _mm256_set1_epi32(1 << k)), _mm256_setzero_si256()));
  const __m256 iv = _mm256_set1_ps(inv);
  for (int t = t0; t < t1; ++t) {
    __m256 lo = _mm256_setzero_ps();
    for (int k = 0; k < 3; ++k) lo = _mm256_add_ps(lo, _mm256_and_ps(m[k], _mm256_broadcast_ss(x + 4 * t + k)));
    const __m256 hi = _mm256_add_ps(lo, _mm256_broadcast_ss(x + 4 * t + 3));
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(lo, iv)), b = _mm256_cvtps_epi32(_mm256_mul_ps(hi, iv));
    __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // 16 int16 in order j
    __m128i q = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128((__m128i*)(tab + t * 16), _mm_xor_si128(q, _mm_set1_epi8((char)0x80)));  // + 128
  }
}

// A LUT-packed weight of N rows and K inputs: packed (N32/32, Kp/8*bits*32) uint8 and
// scales/szeros (N32/32, G, 32) float16, Kp = G * gi. Shared by lut_gemv and lut_dequant.
void check_lut_weight(const char* op, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                      int64_t bits, int64_t gi, int64_t N, int64_t K) {
  check(packed, "packed", at::kByte, 2);
  check(scales, "scales", at::kHalf, 3);
  check(szeros, "szeros", at::kHalf, 3);
  TORCH_CHECK(bits >= 1 && bits <= 4, op, " supports bits 1 to 4, got ", bits);
  TORCH_CHECK(gi > 0 && gi % 32 == 0, "group size must be a positive multiple of 32, got ", gi);
  const int64_t tiles = packed.size(0), G = scales.size(1), Kp = G * gi;
  TORCH_CHECK(scales.sizes() == szeros.sizes() && scales.size(0) == tiles && scales.size(2) == 32, "bad scales layout");
  TORCH_CHECK(packed.size(1) == Kp / 8 * bits * 32, "packed has the wrong size for ", G, " groups of ", gi);
  TORCH_CHECK(N > tiles * 32 - 32 && N <= tiles * 32, "N=", N, " does not match ", tiles, " tiles of 32 rows");
  TORCH_CHECK(K <= Kp && K > Kp - gi, "in_features ", K, " does not match the packed weight's ", G, " groups of ", gi);
}

// Tables of one row of x: (Kp/4, 16) biased uint8, ls (n_chunks), xs (G).
void build_tables(const float* x, int Kp, int gi, uint8_t* tab, float* ls, float* xs) {
  const TabFn tables = level() >= AVX2 ? tables_avx2 : tables_scalar;
  const int G = Kp / gi, cpg = (gi + 63) / 64;
  for (int g = 0; g < G; ++g) {
    float sum = 0.f;
    for (int i = g * gi; i < (g + 1) * gi; ++i) sum += x[i];
    xs[g] = sum;
    for (int c = 0; c < cpg; ++c) {
      const int i0 = g * gi + c * 64, i1 = std::min(i0 + 64, (g + 1) * gi);
      float mx = 0.f;
      for (int t = i0 / 4; t < i1 / 4; ++t) {
        float pos = 0.f, neg = 0.f;
        for (int k = 0; k < 4; ++k) (x[4 * t + k] > 0 ? pos : neg) += x[4 * t + k];
        mx = std::max(mx, std::max(pos, -neg));
      }
      // The same float operations as reference.lut_tables, so the int8 tables are identical.
      const float inv = mx > 0.f ? 127.0f / mx : 0.f;
      ls[g * cpg + c] = mx / 127.0f;
      tables(x, i0 / 4, i1 / 4, inv, tab);
    }
  }
}

using LutFn = void (*)(const uint8_t*, const float*, const float*, const uint8_t*, const f16*,
                       const f16*, int, int, int, float*);

// One tile of 32 rows; y32 receives the rows in natural order.
template <int BITS>
void lut_tile_scalar(const uint8_t* tab, const float* ls, const float* xs, const uint8_t* pk,
                     const f16* s, const f16* sz, int Kp, int gi, int G, float* y32) {
  float Y[32] = {0};
  const int cpg = (gi + 63) / 64;
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < cpg; ++c) {
      const int i0 = g * gi + c * 64, i1 = std::min(i0 + 64, (g + 1) * gi), ntp = (i1 - i0) / 8;
      int32_t acc[32] = {0};
      for (int b = 0; b < BITS; ++b)
        for (int tp = 0; tp < ntp; ++tp, pk += 32) {
          const uint8_t* t0 = tab + (i0 / 4 + 2 * tp) * 16;
          for (int r = 0; r < 32; ++r)
            acc[r] += ((int)t0[pk[r] & 15] + (int)t0[16 + (pk[r] >> 4)] - 256) * (1 << b);
        }
      for (int l = 0; l < 32; ++l)
        Y[l] += h2f(s[g * 32 + l]) * (ls[g * cpg + c] * (float)acc[LUT_PERM[l]]);
    }
  for (int g = 0; g < G; ++g)
    for (int l = 0; l < 32; ++l) Y[l] -= h2f(sz[g * 32 + l]) * xs[g];
  for (int l = 0; l < 32; ++l) y32[LUT_PERM[l]] = Y[l];
}

// Bytes ahead of the weight stream that the LUT kernel prefetches: hardware prefetchers stop at 4 KiB
// pages, and without it a weight streamed from memory (decode) ran ~15% slower (4096x4096, 2 cores).
constexpr int LUT_PREFETCH = 4096;

template <int BITS>
__attribute__((target("avx2,fma,f16c"))) void lut_tile_avx2(const uint8_t* tab, const float* ls, const float* xs,
                                                            const uint8_t* pk, const f16* s, const f16* sz,
                                                            int Kp, int gi, int G, float* y32) {
  __m256 Y[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const int cpg = (gi + 63) / 64;
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < cpg; ++c) {
      const int i0 = g * gi + c * 64, i1 = std::min(i0 + 64, (g + 1) * gi), ntp = (i1 - i0) / 8;
      // Plane b's lookups summed in int16 lanes: A[b] = even-row byte + 256 * odd-row byte (the
      // even sums carry into the odd byte), H[b] = the odd-row bytes alone. Exact mod 2^16.
      __m256i A[BITS], H[BITS];
      for (int b = 0; b < BITS; ++b) A[b] = H[b] = _mm256_setzero_si256();
      for (int off = 0; off < BITS * ntp * 32; off += 64) _mm_prefetch((const char*)(pk + LUT_PREFETCH + off), _MM_HINT_T0);
      for (int tp = 0; tp < ntp; ++tp) {
        const uint8_t* t0 = tab + (i0 / 4 + 2 * tp) * 16;  // the tables of inputs 8tp..8tp+3 and 8tp+4..8tp+7,
        const __m256i ta = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t0));  // read once for
        const __m256i tb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t0 + 16)));  // all planes
        for (int b = 0; b < BITS; ++b) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(pk + (b * ntp + tp) * 32));
          const __m256i r1 = _mm256_shuffle_epi8(ta, _mm256_and_si256(v, nib));
          const __m256i r2 = _mm256_shuffle_epi8(tb, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
          A[b] = _mm256_add_epi16(A[b], _mm256_add_epi16(r1, r2));
          H[b] = _mm256_add_epi16(H[b], _mm256_add_epi16(_mm256_srli_epi16(r1, 8), _mm256_srli_epi16(r2, 8)));
        }
      }
      pk += BITS * ntp * 32;
      // E = sum_b 2^b (even sums - bias), O likewise; the shifts distribute over the mod-2^16 sums, and
      // E and O themselves fit in int16 (|E| <= 2 ntp * 128 * (2^BITS - 1) <= 30720).
      __m256i E = A[0], O = H[0];
      for (int b = 1; b < BITS; ++b) {
        E = _mm256_add_epi16(E, _mm256_slli_epi16(A[b], b));
        O = _mm256_add_epi16(O, _mm256_slli_epi16(H[b], b));
      }
      const __m256i bias = _mm256_set1_epi16((int16_t)(128 * 2 * ntp * ((1 << BITS) - 1)));
      E = _mm256_sub_epi16(_mm256_sub_epi16(E, _mm256_slli_epi16(O, 8)), bias);
      O = _mm256_sub_epi16(O, bias);
      __m256 f[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(E))),
                     _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(E, 1))),
                     _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(O))),
                     _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(O, 1)))};
      const __m256 l = _mm256_set1_ps(ls[g * cpg + c]);
      for (int q = 0; q < 4; ++q) Y[q] = _mm256_fmadd_ps(load8h(s + g * 32 + 8 * q), _mm256_mul_ps(l, f[q]), Y[q]);
    }
  for (int g = 0; g < G; ++g) {
    const __m256 xg = _mm256_set1_ps(xs[g]);
    for (int q = 0; q < 4; ++q) Y[q] = _mm256_fnmadd_ps(load8h(sz + g * 32 + 8 * q), xg, Y[q]);
  }
  float tmp[32];
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(tmp + 8 * q, Y[q]);
  for (int l = 0; l < 32; ++l) y32[LUT_PERM[l]] = tmp[l];
}

LutFn lut_fn(int bits, int lvl) {
  const bool v = lvl >= AVX2;
  switch (bits) {
    case 1: return v ? lut_tile_avx2<1> : lut_tile_scalar<1>;
    case 2: return v ? lut_tile_avx2<2> : lut_tile_scalar<2>;
    case 3: return v ? lut_tile_avx2<3> : lut_tile_scalar<3>;
    case 4: return v ? lut_tile_avx2<4> : lut_tile_scalar<4>;
  }
  TORCH_CHECK(false, "lut_gemv supports bits 1 to 4, got ", bits);
}

// x (..., K) float32 -> y (..., N); packed (N32/32, Kp/8*bits*32) uint8; scales/szeros (N32/32, G, 32).
// Decoding calls this for every linear of every token, so the per-call work outside the tiles is kept
// small: the tables live in this thread's reused buffers, and y is written in place.
at::Tensor lut_gemv(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                    const at::Tensor& szeros, int64_t bits, int64_t gi, int64_t N) {
  std::vector<int64_t> out_shape;
  const at::Tensor x = rows_of(x_in, N, out_shape);
  const int M = x.size(0), K = x.size(1);
  check_lut_weight("lut_gemv", packed, scales, szeros, bits, gi, N, K);
  const int tiles = packed.size(0), G = scales.size(1), Kp = G * gi, cpg = (gi + 63) / 64;
  at::Tensor xp = K == Kp ? x : at::constant_pad_nd(x, {0, Kp - K});
  static thread_local std::vector<uint8_t> tab;  // (M, Kp/4, 16) biased int8 tables
  static thread_local std::vector<float> ls, xs;  // (M, G*cpg) table scales, (M, G) sums of x
  tab.resize((size_t)M * Kp * 4), ls.resize((size_t)M * G * cpg), xs.resize((size_t)M * G);
  for (int m = 0; m < M; ++m)
    build_tables(xp.data_ptr<float>() + (int64_t)m * Kp, Kp, gi, tab.data() + (int64_t)m * Kp * 4,
                 ls.data() + m * G * cpg, xs.data() + m * G);
  at::Tensor y = at::empty({M, N}, x.options());
  LutFn fn = lut_fn(bits, level());
  const uint8_t *pk = packed.data_ptr<uint8_t>(), *ptab = tab.data();
  const float *pls = ls.data(), *pxs = xs.data();
  const int64_t tb = packed.size(1);
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    float last[32];  // a partial last tile writes its 32 lanes here first
    for (int64_t t = b; t < e; ++t)
      for (int m = 0; m < M; ++m) {
        float* yt = py + (int64_t)m * N + t * 32;
        const bool whole = t * 32 + 32 <= N;
        fn(ptab + (int64_t)m * Kp * 4, pls + m * G * cpg, pxs + m * G, pk + t * tb, ps + t * G * 32,
           psz + t * G * 32, Kp, gi, G, whole ? yt : last);
        if (!whole) std::memcpy(yt, last, sizeof(float) * (N - t * 32));
      }
  });
  return y.view(out_shape);
}

// Dequantize a LUT-packed weight to float32 (out, in) for large batches (prefill), where
// MKL's float GEMM beats table lookups: W[o, i] = s[o, g] * q[o, i] - sz[o, g]. Byte r of
// (chunk, plane b, pair tp) holds bit b of the codes of row r at inputs i0 + 8tp + 0..7.
using LutDqFn = void (*)(const uint8_t*, const f16*, const f16*, int, int, int, int, float*, int64_t);

inline int lut_lane(int r) { return r % 2 ? 16 + r / 2 : r / 2; }  // inverse of LUT_PERM

// One tile: rows r < nrows of the tile go to w + r * ldw, columns < K.
template <int BITS>
void lut_dq_tile_scalar(const uint8_t* pk, const f16* s, const f16* sz, int G, int gi, int K, int nrows,
                        float* w, int64_t ldw) {
  const int cpg = (gi + 63) / 64;
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < cpg; ++c) {
      const int i0 = g * gi + c * 64, ntp = (std::min(i0 + 64, (g + 1) * gi) - i0) / 8;
      for (int r = 0; r < nrows; ++r) {
        const float sr = h2f(s[g * 32 + lut_lane(r)]), zr = h2f(sz[g * 32 + lut_lane(r)]);
        for (int tp = 0; tp < ntp; ++tp)
          for (int j = 0; j < 8 && i0 + 8 * tp + j < K; ++j) {
            int q = 0;
            for (int b = 0; b < BITS; ++b) q |= ((pk[(b * ntp + tp) * 32 + r] >> j) & 1) << b;
            w[r * ldw + i0 + 8 * tp + j] = std::fma(sr, (float)q, -zr);
          }
      }
      pk += BITS * ntp * 32;
    }
}

// BIT8[B] holds, as 8 floats, the bits of byte B (low bit first).
struct Bit8Table {
  alignas(32) float v[256][8];
  Bit8Table() { for (int B = 0; B < 256; ++B) for (int j = 0; j < 8; ++j) v[B][j] = (float)((B >> j) & 1); }
};
const Bit8Table BIT8;

template <int BITS>
__attribute__((target("avx2,fma,f16c"))) void lut_dq_tile_avx2(const uint8_t* pk, const f16* s, const f16* sz, int G,
                                                               int gi, int K, int nrows, float* w, int64_t ldw) {
  const int cpg = (gi + 63) / 64;
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < cpg; ++c) {
      const int i0 = g * gi + c * 64, ntp = (std::min(i0 + 64, (g + 1) * gi) - i0) / 8;
      for (int r = 0; r < nrows; ++r) {
        const __m256 sr = _mm256_set1_ps(h2f_v(s[g * 32 + lut_lane(r)]));
        const __m256 zr = _mm256_set1_ps(h2f_v(sz[g * 32 + lut_lane(r)]));
        float* wr = w + r * ldw + i0;
        for (int tp = 0; tp < ntp; ++tp) {
          __m256 q = _mm256_load_ps(BIT8.v[pk[tp * 32 + r]]);
          for (int b = 1; b < BITS; ++b)  // q += 2^b * bits of plane b (exact small integers)
            q = _mm256_fmadd_ps(_mm256_load_ps(BIT8.v[pk[(b * ntp + tp) * 32 + r]]), _mm256_set1_ps((float)(1 << b)), q);
          const __m256 v = _mm256_fmsub_ps(sr, q, zr);
          if (i0 + 8 * tp + 8 <= K) {
            _mm256_storeu_ps(wr + 8 * tp, v);
          } else if (i0 + 8 * tp < K) {  // the last, partial 8 columns
            float tmp[8];
            _mm256_storeu_ps(tmp, v);
            std::memcpy(wr + 8 * tp, tmp, sizeof(float) * (K - i0 - 8 * tp));
          }
        }
      }
      pk += BITS * ntp * 32;
    }
}

LutDqFn lut_dq_fn(int bits, int lvl) {
  const bool v = lvl >= AVX2;
  switch (bits) {
    case 1: return v ? lut_dq_tile_avx2<1> : lut_dq_tile_scalar<1>;
    case 2: return v ? lut_dq_tile_avx2<2> : lut_dq_tile_scalar<2>;
    case 3: return v ? lut_dq_tile_avx2<3> : lut_dq_tile_scalar<3>;
    case 4: return v ? lut_dq_tile_avx2<4> : lut_dq_tile_scalar<4>;
  }
  TORCH_CHECK(false, "lut_dequant supports bits 1 to 4, got ", bits);
}

// packed (N32/32, Kp/8*bits*32) uint8; scales/szeros (N32/32, G, 32) -> W (N, K) float32.
at::Tensor lut_dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros, int64_t bits,
                       int64_t gi, int64_t N, int64_t K) {
  check_lut_weight("lut_dequant", packed, scales, szeros, bits, gi, N, K);
  const int tiles = packed.size(0), G = scales.size(1);
  at::Tensor W = at::empty({N, K}, scales.options().dtype(at::kFloat));
  LutDqFn fn = lut_dq_fn(bits, level());
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const int64_t tb = packed.size(1);
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  float* pw = W.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      fn(pk + t * tb, ps + t * G * 32, psz + t * G * 32, G, gi, K, (int)std::min<int64_t>(32, N - t * 32),
         pw + t * 32 * K, K);
  });
  return W;
}

// ---------------------------------------------------------------------------------------
// 3. W8A8: int32 C[m, n] = sum_k xq[m, k] * wq[n, k] (int8 x int8), exact.
//    AVX-512 VNNI: vpdpbusd(u8, s8) with xq + 128 as the unsigned operand, minus 128 * sum wq.
//    AVX2: sign-extend to int16 and vpmaddwd.
// ---------------------------------------------------------------------------------------
using I8Fn = int32_t (*)(const int8_t*, const int8_t*, int);

int32_t dot_i8_scalar(const int8_t* a, const int8_t* b, int K) {
  int32_t s = 0;
  for (int k = 0; k < K; ++k) s += (int32_t)a[k] * b[k];
  return s;
}

__attribute__((target("avx2,fma,f16c"))) int32_t dot_i8_avx2(const int8_t* a, const int8_t* b, int K) {
  __m256i acc = _mm256_setzero_si256();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(a + k)));
    __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + k)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s) + dot_i8_scalar(a + k, b + k, K - k);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) int32_t dot_i8_vnni(const int8_t* a, const int8_t* b,
                                                                                        int K) {
  __m512i acc = _mm512_setzero_si512(), wsum = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8((char)0x80), ones = _mm512_set1_epi8(1);
  int k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i va = _mm512_xor_si512(_mm512_loadu_si512(a + k), flip);  // a + 128 as uint8
    __m512i vb = _mm512_loadu_si512(b + k);
    acc = _mm512_dpbusd_epi32(acc, va, vb);
    wsum = _mm512_dpbusd_epi32(wsum, ones, vb);
  }
  return _mm512_reduce_add_epi32(acc) - 128 * _mm512_reduce_add_epi32(wsum) + dot_i8_scalar(a + k, b + k, K - k);
}

at::Tensor int8_gemm(const at::Tensor& xq, const at::Tensor& wq) {
  check(xq, "xq", at::kChar, 2);
  check(wq, "wq", at::kChar, 2);
  TORCH_CHECK(xq.size(1) == wq.size(1), "xq (M, K) and wq (N, K) disagree on K: ", xq.size(1), " vs ", wq.size(1));
  const int M = xq.size(0), N = wq.size(0), K = xq.size(1);
  const int lvl = level();
  I8Fn fn = lvl >= AVX512 ? dot_i8_vnni : lvl >= AVX2 ? dot_i8_avx2 : dot_i8_scalar;
  at::Tensor C = at::empty({M, N}, xq.options().dtype(at::kInt));
  const int8_t *pa = xq.data_ptr<int8_t>(), *pb = wq.data_ptr<int8_t>();
  int32_t* pc = C.data_ptr<int32_t>();
  at::parallel_for(0, N, 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int m = 0; m < M; ++m) pc[(int64_t)m * N + n] = fn(pa + (int64_t)m * K, pb + n * K, K);
  });
  return C;
}

// ---------------------------------------------------------------------------------------
// 4. 2:4 sparse GEMV: per row, Kp/2 values and, for each 8 values (4 groups of 4 inputs),
//    a uint16 of 2-bit positions; value j sits at input 4*(j/2) + pos_j.
// ---------------------------------------------------------------------------------------
using SpFn = void (*)(const float*, int, int, const float*, const uint16_t*, float*, int, int);

void sp_row_scalar(const float* x, int M, int Kp, const float* v, const uint16_t* ix, float* y, int N, int o) {
  for (int m = 0; m < M; ++m) {
    const float* xm = x + (int64_t)m * Kp;
    float acc = 0.f;
    for (int b = 0; b < Kp / 16; ++b)
      for (int j = 0; j < 8; ++j) acc += v[b * 8 + j] * xm[b * 16 + 4 * (j / 2) + ((ix[b] >> (2 * j)) & 3)];
    y[(int64_t)m * N + o] = acc;
  }
}

__attribute__((target("avx2,fma,f16c"))) void sp_row_avx2(const float* x, int M, int Kp, const float* v,
                                                          const uint16_t* ix, float* y, int N, int o) {
  const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  for (int m = 0; m < M; ++m) {
    const float* xm = x + (int64_t)m * Kp;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < Kp / 16; ++b) {
      __m256i p = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(ix[b]), sh), _mm256_set1_epi32(3)), base);
      __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xm + 16 * b), p);
      __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xm + 16 * b + 8), p);
      __m256 xv = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(p, 28)));
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8 * b), xv, acc);
    }
    y[(int64_t)m * N + o] = hsum(acc);
  }
}

// x (..., K) float32 -> y (..., N).
at::Tensor sparse24_matmul(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& index) {
  check(values, "values", at::kFloat, 2);
  check(index, "index", at::kShort, 2);
  std::vector<int64_t> out_shape;
  const at::Tensor x = rows_of(x_in, values.size(0), out_shape);
  const int M = x.size(0), K = x.size(1), N = values.size(0), Kp = values.size(1) * 2;
  TORCH_CHECK(Kp % 16 == 0 && index.size(0) == N && index.size(1) == Kp / 16, "values (N, Kp/2) and index (N, Kp/16) disagree");
  TORCH_CHECK(K <= Kp && K > Kp - 16, "x has ", K, " features; the packed weight has ", Kp, " (padded)");
  at::Tensor xp = K == Kp ? x : at::constant_pad_nd(x, {0, Kp - K});
  at::Tensor y = at::empty({M, N}, x.options());
  SpFn fn = level() >= AVX2 ? sp_row_avx2 : sp_row_scalar;
  const float *px = xp.data_ptr<float>(), *pv = values.data_ptr<float>();
  const uint16_t* pi = (const uint16_t*)index.data_ptr<int16_t>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) fn(px, M, Kp, pv + o * (Kp / 2), pi + o * (Kp / 16), py, N, o);
  });
  return y.view(out_shape);
}

// The dense (N, K) float32 weight of a 2:4 pair (values, index), for large batches (prefill).
// A scatter bound by the store of N*K floats, so one portable path serves every CPU.
at::Tensor sparse24_dense(const at::Tensor& values, const at::Tensor& index, int64_t K) {
  check(values, "values", at::kFloat, 2);
  check(index, "index", at::kShort, 2);
  const int N = values.size(0), Kp = values.size(1) * 2;
  TORCH_CHECK(Kp % 16 == 0 && index.size(0) == N && index.size(1) == Kp / 16, "values (N, Kp/2) and index (N, Kp/16) disagree");
  TORCH_CHECK(K <= Kp && K > Kp - 16, "in_features ", K, " does not match ", Kp, " packed (padded) inputs");
  at::Tensor W = at::zeros({N, Kp}, values.options());
  const float* pv = values.data_ptr<float>();
  const uint16_t* pi = (const uint16_t*)index.data_ptr<int16_t>();
  float* pw = W.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int blk = 0; blk < Kp / 16; ++blk) {
        const uint16_t ix = pi[o * (Kp / 16) + blk];
        const float* v = pv + o * (Kp / 2) + 8 * blk;
        float* w = pw + o * Kp + 16 * blk;
        for (int j = 0; j < 8; ++j) w[4 * (j / 2) + ((ix >> (2 * j)) & 3)] += v[j];  // += as the reference's scatter_add
      }
  });
  return K == Kp ? W : W.narrow(1, 0, K).contiguous();
}

}  // namespace

TORCH_LIBRARY(shrink, m) {
  m.def("simd_level() -> int", &simd_level);
  m.def("simd_max_level() -> int", &simd_max_level);
  m.def("set_simd_level(int level) -> int", &set_simd_level);
  m.def("qmatmul(Tensor x, Tensor packed, Tensor scales, Tensor szeros, Tensor codebook, int bits, int group_size) -> Tensor", &qmatmul);
  m.def("qdequant(Tensor packed, Tensor scales, Tensor szeros, Tensor codebook, int bits, int group_size, int in_features) -> Tensor", &qdequant);
  m.def("lut_gemv(Tensor x, Tensor packed, Tensor scales, Tensor szeros, int bits, int group_size, int out_features) -> Tensor", &lut_gemv);
  m.def("lut_dequant(Tensor packed, Tensor scales, Tensor szeros, int bits, int group_size, int out_features, int in_features) -> Tensor", &lut_dequant);
  m.def("int8_gemm(Tensor xq, Tensor wq) -> Tensor", &int8_gemm);
  m.def("sparse24_dense(Tensor values, Tensor index, int in_features) -> Tensor", &sparse24_dense);
  m.def("sparse24_matmul(Tensor x, Tensor values, Tensor index) -> Tensor", &sparse24_matmul);
}

// Direct Python bindings of the per-token kernels: torch.ops' dispatch costs ~2 us a call from
// Python, and a decoding model calls a kernel for every linear of every token (211 per token for
// SmolLM2). The torch.ops.shrink.* operators above stay for everything else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul);
  m.def("lut_gemv", &lut_gemv);
  m.def("sparse24_matmul", &sparse24_matmul);
}
