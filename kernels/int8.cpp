// W8A8: exact int32 GEMM of int8 activations and weights (int8_gemm), and the whole W8A8 linear
// (dynamic activation quantization, GEMM, scales) in one call (w8a8_linear).
//    C[m, n] = sum_k xq[m, k] * wq[n, k], exact in int32.
//    AVX-512 VNNI: vpdpbusd(u8, s8) with xq + 128 as the unsigned operand, minus 128 * sum_k wq[n, k].
//    AVX2: sign-extend to int16 and vpmaddwd (vpmaddubsw would saturate 255 * 127 * 2 in int16).
//    Four rows of x share each load of a weight row (AVX-512: a tile of 4 rows of x by 4 weight rows).
#include "common.h"

namespace shrink {

namespace {

constexpr int MB = 4;  // rows of x per weight load

// C[m * ldc] for m < nm of rows a + m * K against one weight row b (wsum = sum_k b[k]).
void dots_scalar(const int8_t* a, int nm, const int8_t* b, int32_t /*wsum*/, int K, int32_t* c, int64_t ldc) {
  for (int m = 0; m < nm; ++m) {
    int32_t s = 0;
    for (int k = 0; k < K; ++k) s += (int32_t)a[(int64_t)m * K + k] * b[k];
    c[m * ldc] = s;
  }
}

__attribute__((target("avx2,fma,f16c"))) inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma,f16c"))) void dots_avx2(const int8_t* a, int nm, const int8_t* b, int32_t wsum, int K,
                                                        int32_t* c, int64_t ldc) {
  int m = 0;
  for (; m + MB <= nm; m += MB) {
    __m256i acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_si256();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + k)));
      for (int r = 0; r < MB; ++r) {
        const __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(a + (int64_t)(m + r) * K + k)));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(va, vb));
      }
    }
    for (int r = 0; r < MB; ++r) {
      int32_t s = hsum_i32(acc[r]);
      for (int kk = k; kk < K; ++kk) s += (int32_t)a[(int64_t)(m + r) * K + kk] * b[kk];
      c[(m + r) * ldc] = s;
    }
  }
  if (m < nm) {  // the last rows, one at a time
    for (; m < nm; ++m) {
      __m256i acc = _mm256_setzero_si256();
      int k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + k)));
        const __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(a + (int64_t)m * K + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
      }
      int32_t s = hsum_i32(acc);
      for (; k < K; ++k) s += (int32_t)a[(int64_t)m * K + k] * b[k];
      c[m * ldc] = s;
    }
  }
  (void)wsum;
}

// VNNI: a (M, K) holds xq + 128 as uint8 (flipped once per call); R rows of x times NB weight rows in
// registers, each 64-byte load of x or of a weight row feeding NB or R vpdpbusd.
template <int R, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"), always_inline)) inline void tile_vnni(
    const uint8_t* a, const int8_t* b, const int32_t* wsum, int K, int32_t* c, int64_t ldc) {
  __m512i acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int k = 0; k < K; k += 64) {  // the last 64 bytes masked: zero bytes add nothing
    const __mmask64 mask = k + 64 <= K ? ~0ULL : (1ULL << (K - k)) - 1;
    __m512i vb[NB];
    for (int j = 0; j < NB; ++j) vb[j] = _mm512_maskz_loadu_epi8(mask, b + (int64_t)j * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512i va = _mm512_maskz_loadu_epi8(mask, a + (int64_t)r * K + k);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], va, vb[j]);
    }
  }
  for (int r = 0; r < R; ++r)  // sum_k (xq + 128) wq - 128 sum_k wq
    for (int j = 0; j < NB; ++j) c[r * ldc + j] = _mm512_reduce_add_epi32(acc[r][j]) - 128 * wsum[j];
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void rows_vnni(const uint8_t* a, int M, const int8_t* b,
                                                                                 const int32_t* wsum, int K, int32_t* c, int64_t ldc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) tile_vnni<4, NB>(a + (int64_t)m * K, b, wsum, K, c + m * ldc, ldc);
  for (; m < M; ++m) tile_vnni<1, NB>(a + (int64_t)m * K, b, wsum, K, c + m * ldc, ldc);
}

using DotsFn = void (*)(const int8_t*, int, const int8_t*, int32_t, int, int32_t*, int64_t);

DotsFn dots_fn() { return level() >= AVX2 ? dots_avx2 : dots_scalar; }

// C (M, N) int32 = xq (M, K) wq (N, K)^T; wsum (N,) int32 = sums of the rows of wq.
void gemm_i8(const int8_t* pa, const int8_t* pb, const int32_t* pws, int M, int N, int K, int32_t* pc) {
  if (level() >= AVX512) {
    static thread_local std::vector<uint8_t> au;  // xq + 128 as uint8, the unsigned operand of vpdpbusd
    au.resize((size_t)M * K);
    for (int64_t i = 0; i < (int64_t)M * K; ++i) au[i] = (uint8_t)(pa[i] ^ 0x80);
    const uint8_t* a = au.data();
    at::parallel_for(0, (N + 3) / 4, 2, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = 4 * t;
        if (n + 4 <= N) rows_vnni<4>(a, M, pb + n * K, pws + n, K, pc + n, N);
        else for (int64_t j = n; j < N; ++j) rows_vnni<1>(a, M, pb + j * K, pws + j, K, pc + j, N);
      }
    });
    return;
  }
  DotsFn fn = dots_fn();
  at::parallel_for(0, N, 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) fn(pa, M, pb + n * K, pws[n], K, pc + n, N);
  });
}

}  // namespace

at::Tensor int8_gemm(const at::Tensor& xq, const at::Tensor& wq) {
  check(xq, "xq", at::kChar, 2);
  check(wq, "wq", at::kChar, 2);
  TORCH_CHECK(xq.size(1) == wq.size(1), "xq (M, K) and wq (N, K) disagree on K: ", xq.size(1), " vs ", wq.size(1));
  const int M = xq.size(0), N = wq.size(0), K = xq.size(1);
  at::Tensor wsum = wq.sum(1, /*keepdim=*/false, at::kInt).contiguous();
  at::Tensor C = at::empty({M, N}, xq.options().dtype(at::kInt));
  gemm_i8(xq.data_ptr<int8_t>(), wq.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(), M, N, K, C.data_ptr<int32_t>());
  return C;
}

// y (..., N) float32 = (s_x xq) (s_w wq)^T with xq = clamp(round(x / s_x), -a_qmax, a_qmax) and
// s_x = max(max|x|, 1e-8) / a_qmax per row (per_token) or over all of x: the float operations of
// shrinklib.quant.smoothquant.quantize_activations, so the codes are the same; C in int32, then
// y = (float(C) * s_x) * s_w[n].
at::Tensor w8a8_linear(const at::Tensor& x_in, const at::Tensor& wq, const at::Tensor& wsum, const at::Tensor& w_scale,
                       int64_t a_qmax, bool per_token) {
  check(wq, "wq", at::kChar, 2);
  check(wsum, "wsum", at::kInt, 1);
  check(w_scale, "w_scale", at::kFloat, 1);
  TORCH_CHECK(a_qmax >= 1 && a_qmax <= 127, "a_qmax must be in 1..127, got ", a_qmax);
  const int N = wq.size(0), K = wq.size(1);
  TORCH_CHECK(wsum.size(0) == N && w_scale.size(0) == N, "wsum and w_scale must have one value per row of wq");
  std::vector<int64_t> out_shape;
  const at::Tensor x = rows_of(x_in, N, out_shape);
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features; wq has ", K);
  const int M = x.size(0);
  const float* px = x.data_ptr<float>();
  std::vector<float> sx(M);
  const float qmax = (float)a_qmax;
  for (int m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int k = 0; k < K; ++k) amax = std::max(amax, std::fabs(px[(int64_t)m * K + k]));
    sx[m] = amax;
  }
  if (!per_token) {
    const float all = M ? *std::max_element(sx.begin(), sx.end()) : 0.f;
    std::fill(sx.begin(), sx.end(), all);
  }
  for (auto& s : sx) s = std::max(s, 1e-8f) / qmax;
  static thread_local std::vector<int8_t> xq;
  static thread_local std::vector<int32_t> C;
  xq.resize((size_t)M * K), C.resize((size_t)M * N);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) {
      const float q = std::nearbyint(px[(int64_t)m * K + k] / sx[m]);
      xq[(int64_t)m * K + k] = (int8_t)std::min(qmax, std::max(-qmax, q));
    }
  gemm_i8(xq.data(), wq.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(), M, N, K, C.data());
  at::Tensor y = at::empty({M, N}, x.options());
  float* py = y.data_ptr<float>();
  const float* pw = w_scale.data_ptr<float>();
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) py[(int64_t)m * N + n] = ((float)C[(int64_t)m * N + n] * sx[m]) * pw[n];
  return y.view(out_shape);
}

}  // namespace shrink
