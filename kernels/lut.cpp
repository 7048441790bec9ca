// T-MAC lookup-table GEMV for 1-4 bit weights (lut_gemv) and the dequantization of its layout to
// float32 (lut_dequant) for large batches.
#include "common.h"

namespace shrink {

namespace {

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

}  // namespace

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

// packed (N32/32, Kp/8*bits*32) uint8; scales/szeros (N32/32, G, 32) -> W (N, >= K) float32 with
// contiguous rows, columns >= K left alone (a buffer reused across calls, see qdequant_into).
void lut_dequant_into(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros, int64_t bits,
                      int64_t gi, int64_t N, int64_t K, const at::Tensor& W) {
  check_lut_weight("lut_dequant", packed, scales, szeros, bits, gi, N, K);
  TORCH_CHECK(W.scalar_type() == at::kFloat && W.dim() == 2 && W.size(0) == N && W.size(1) >= K && W.stride(1) == 1,
              "the buffer must be float32 (", N, ", >= ", K, ") with contiguous rows");
  const int tiles = packed.size(0), G = scales.size(1);
  LutDqFn fn = lut_dq_fn(bits, level());
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const int64_t tb = packed.size(1), ldw = W.stride(0);
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  float* pw = W.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      fn(pk + t * tb, ps + t * G * 32, psz + t * G * 32, G, gi, K, (int)std::min<int64_t>(32, N - t * 32),
         pw + t * 32 * ldw, ldw);
  });
}

at::Tensor lut_dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros, int64_t bits,
                       int64_t gi, int64_t N, int64_t K) {
  at::Tensor W = at::empty({N, K}, scales.options().dtype(at::kFloat));
  lut_dequant_into(packed, scales, szeros, bits, gi, N, K, W);
  return W;
}

}  // namespace shrink
