// Shared by every kernel family of the shrink suite: the SIMD levels, input checks, float16
// helpers and the declarations of every operator (registered in ops.cpp).
//
// Every kernel has an AVX2/FMA/F16C path (and AVX-512 where it pays, with VNNI for the int8 GEMM),
// compiled with per-function target attributes, and a portable scalar path; the path is chosen at
// run time from the CPU's features (simd.cpp), and can be forced lower for tests. Rows of the
// output are split over threads. The layouts are made by shrinklib/kernels/pack.py, which also
// documents them; shrinklib/kernels/reference.py computes the same functions in PyTorch.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace shrink {

enum { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
int max_level();  // the best path this CPU has
int level();      // the path in use now

inline void check(const at::Tensor& t, const char* name, at::ScalarType dt, int dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// x (..., K) float32 on the CPU as contiguous rows (M, K), and the shape (..., N) of the output.
inline at::Tensor rows_of(const at::Tensor& x, int64_t N, std::vector<int64_t>& out_shape) {
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

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
}

// Many rows of x (a prefill, a batch, a verification of drafted tokens): a GEMV that decodes each
// weight in registers re-reads all of x for every output row, and x of 16 rows x 4096 inputs no longer
// fits the first-level cache; the BLAS does better on the float weight. Up to TILE_MAX_X_BYTES of x,
// each thread dequantizes a tile of output rows at a time (about TILE_BYTES, a multiple of TILE_ROWS
// rows, at least one tile per thread) into a buffer of its own, where it stays in that core's cache,
// and multiplies it by x: the packed weight is read from memory once and the float weight is never
// materialized whole (a weight-sized float32 tensor written and read back per call is
// 8x the traffic of 4-bit codes). A larger x would be re-read from memory for every tile: then the
// whole weight (up to WHOLE_MAX_BYTES) is dequantized into a buffer reused across calls (a fresh one
// costs a page fault per 4 KiB) and multiplied in one call.
constexpr int64_t TILE_ROWS = 64, TILE_BYTES = 1 << 20;
constexpr int64_t TILE_MAX_X_BYTES = 1 << 20;
constexpr int64_t WHOLE_MAX_BYTES = 64 << 20;

// y (M, N) = x (M, Kp) W^T, where dq(o0, o1, w) writes rows o0..o1-1 of the float W (o1 - o0, Kp) to w.
template <class DqRows>
at::Tensor dequant_matmul(const at::Tensor& x, int64_t N, DqRows dq) {
  const int64_t M = x.size(0), Kp = x.size(1);
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t T = std::max(TILE_ROWS, std::min(TILE_BYTES / (4 * Kp), per_thread + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS);
  const int64_t tiles = (N + T - 1) / T;
  if (M * Kp * 4 > TILE_MAX_X_BYTES && N * Kp * 4 <= WHOLE_MAX_BYTES) {
    static thread_local std::vector<float> whole;  // the calling thread's; its workers fill it
    whole.resize(N * Kp);
    float* w = whole.data();
    at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) dq(t * T, std::min(N, t * T + T), w + t * T * Kp);
    });
    return at::mm(x, at::from_blob(w, {N, Kp}, x.options()).t());
  }
  // Measured (2 threads, AVX-512): a batch of 16 rows on 4096x4096 int4 took 3.9 ms written as tiles
  // of y^T (contiguous, transposed at the end) and 7.8 ms written into column blocks of y; 512 rows on
  // the 49152x576 head took 131 ms into column blocks of y and 205 ms as tiles of y^T (the transpose
  // of 100 MB). So: y^T for a few rows, y for many.
  const bool by_columns = M > 64;
  at::Tensor y = by_columns ? at::empty({M, N}, x.options()) : at::empty({N, M}, x.options());
  const at::Tensor xt = x.t();
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    static thread_local std::vector<float> buf;
    buf.resize(T * Kp);
    for (int64_t t = b; t < e; ++t) {
      const int64_t o0 = t * T, n = std::min(T, N - o0);
      dq(o0, o0 + n, buf.data());
      const at::Tensor w = at::from_blob(buf.data(), {n, Kp}, x.options());
      if (by_columns) {
        at::Tensor out = y.narrow(1, o0, n);  // rows with leading dimension N, as the BLAS writes them
        at::mm_out(out, x, w.t());
      } else {
        at::Tensor out = y.narrow(0, o0, n);  // contiguous rows of y^T
        at::mm_out(out, w, xt);
      }
    }
  });
  return by_columns ? y : y.t().contiguous();
}

// The operators (schemas in ops.cpp).
int64_t simd_level();
int64_t simd_max_level();
int64_t set_simd_level(int64_t l);
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                   const at::Tensor& codebook, int64_t bits, int64_t gi);
at::Tensor qdequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                    const at::Tensor& codebook, int64_t bits, int64_t gi, int64_t K);
at::Tensor lut_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                    int64_t bits, int64_t gi, int64_t N);
at::Tensor lut_dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros, int64_t bits,
                       int64_t gi, int64_t N, int64_t K);
void qdequant_into(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                   const at::Tensor& codebook, int64_t bits, int64_t gi, const at::Tensor& W);
void lut_dequant_into(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros, int64_t bits,
                      int64_t gi, int64_t N, int64_t K, const at::Tensor& W);
at::Tensor int8_gemm(const at::Tensor& xq, const at::Tensor& wq);
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wsum, const at::Tensor& w_scale,
                       int64_t a_qmax, bool per_token);
at::Tensor sparse24_matmul(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index);
at::Tensor sparse24_dense(const at::Tensor& values, const at::Tensor& index, int64_t K);

}  // namespace shrink
