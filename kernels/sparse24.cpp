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


// A few rows of x at once (5 to SP_BATCH_MAX_ROWS): x transposed to (Kp, Mp), Mp = M rounded up to
// the vector width, so that the rows' inputs at one position are one vector; each kept value is one
// FMA of its broadcast with the vector of its position, for all rows at once, and the weight's 2:4
// zeros cost nothing (a dense GEMM multiplies them). yT (N, Mp) receives the rows of output o.
using SpBatchFn = void (*)(const float*, int, int, const float*, const uint16_t*, float*);

void sp_batch_scalar(const float* xt, int Mp, int Kp, const float* v, const uint16_t* ix, float* yo) {
  for (int m = 0; m < Mp; ++m) yo[m] = 0.f;
  for (int b = 0; b < Kp / 16; ++b)
    for (int j = 0; j < 8; ++j) {
      const float* xp = xt + (int64_t)(16 * b + 4 * (j / 2) + ((ix[b] >> (2 * j)) & 3)) * Mp;
      for (int m = 0; m < Mp; ++m) yo[m] += v[8 * b + j] * xp[m];
    }
}

__attribute__((target("avx2,fma,f16c"))) void sp_batch_avx2(const float* xt, int Mp, int Kp, const float* v,
                                                            const uint16_t* ix, float* yo) {
  for (int c = 0; c < Mp; c += 8) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < Kp / 16; ++b)
      for (int j = 0; j < 8; ++j) {
        const float* xp = xt + (int64_t)(16 * b + 4 * (j / 2) + ((ix[b] >> (2 * j)) & 3)) * Mp + c;
        acc[j & 3] = _mm256_fmadd_ps(_mm256_set1_ps(v[8 * b + j]), _mm256_loadu_ps(xp), acc[j & 3]);
      }
    _mm256_storeu_ps(yo + c, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void sp_batch_avx512(
    const float* xt, int Mp, int Kp, const float* v, const uint16_t* ix, float* yo) {
  for (int c = 0; c < Mp; c += 16) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < Kp / 16; ++b)
      for (int j = 0; j < 8; ++j) {
        const float* xp = xt + (int64_t)(16 * b + 4 * (j / 2) + ((ix[b] >> (2 * j)) & 3)) * Mp + c;
        acc[j & 3] = _mm512_fmadd_ps(_mm512_set1_ps(v[8 * b + j]), _mm512_loadu_ps(xp), acc[j & 3]);
      }
    _mm512_storeu_ps(yo + c, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
}

// Row o of the dense weight (Kp floats) into w: zeros, then each value += at its position (as the
// reference's scatter_add).
inline void sp_dense_row(const float* v, const uint16_t* ix, int Kp, float* w) {
  std::memset(w, 0, sizeof(float) * Kp);
  for (int blk = 0; blk < Kp / 16; ++blk)
    for (int j = 0; j < 8; ++j) w[16 * blk + 4 * (j / 2) + ((ix[blk] >> (2 * j)) & 3)] += v[8 * blk + j];
}

// Up to 4 rows: the GEMV, row by row; up to SP_BATCH_MAX_ROWS: the transposed-x kernel (its cost per
// kept value hardly grows with the rows); above: the dense weight and the BLAS (dequant_matmul), whose
// GEMM outruns one FMA per kept value on many rows.
constexpr int SP_GEMV_MAX_ROWS = 4, SP_BATCH_MAX_ROWS = 32;

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
  const float* pv = values.data_ptr<float>();
  const uint16_t* pi = (const uint16_t*)index.data_ptr<int16_t>();
  if (M > SP_BATCH_MAX_ROWS)
    return dequant_matmul(xp, N, [&](int64_t o0, int64_t o1, float* w) {
      for (int64_t o = o0; o < o1; ++o) sp_dense_row(pv + o * (Kp / 2), pi + o * (Kp / 16), Kp, w + (o - o0) * Kp);
    }).view(out_shape);
  if (M > SP_GEMV_MAX_ROWS) {
    const int lvl = level(), width = lvl >= AVX512 ? 16 : 8, Mp = (M + width - 1) / width * width;
    const SpBatchFn fn = lvl >= AVX512 ? sp_batch_avx512 : lvl >= AVX2 ? sp_batch_avx2 : sp_batch_scalar;
    const at::Tensor xt = at::constant_pad_nd(xp, {0, 0, 0, Mp - M}).t().contiguous();  // (Kp, Mp)
    at::Tensor yT = at::empty({N, Mp}, x.options());
    const float* pxt = xt.data_ptr<float>();
    float* pyt = yT.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) fn(pxt, Mp, Kp, pv + o * (Kp / 2), pi + o * (Kp / 16), pyt + o * Mp);
    });
    return yT.narrow(1, 0, M).t().contiguous().view(out_shape);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  SpFn fn = level() >= AVX2 ? sp_row_avx2 : sp_row_scalar;
  const float* px = xp.data_ptr<float>();
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
  at::Tensor W = at::empty({N, Kp}, values.options());
  const float* pv = values.data_ptr<float>();
  const uint16_t* pi = (const uint16_t*)index.data_ptr<int16_t>();
  float* pw = W.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) sp_dense_row(pv + o * (Kp / 2), pi + o * (Kp / 16), Kp, pw + o * Kp);
  });
  return K == Kp ? W : W.narrow(1, 0, K).contiguous();
}


}  // namespace shrink
