// 2:4 sparse weights: the GEMV on values plus 2-bit positions (sparse24_matmul), and the dense
// weight for large batches (sparse24_dense).
#include "common.h"

namespace shrink {

namespace {

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


}  // namespace

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


}  // namespace shrink
