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
