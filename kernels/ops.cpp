// The operators of the shrink kernels: schemas (torch.ops.shrink.*), their CPU implementations, and
// direct Python bindings of the per-token kernels. shrinklib/kernels/__init__.py registers a fake
// (meta) implementation of each, so a model on these kernels can be traced and compiled.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(shrink, m) {
  m.def("simd_level() -> int", &shrink::simd_level);
  m.def("simd_max_level() -> int", &shrink::simd_max_level);
  m.def("set_simd_level(int level) -> int", &shrink::set_simd_level);
  m.def("qmatmul(Tensor x, Tensor packed, Tensor scales, Tensor szeros, Tensor codebook, int bits, int group_size) -> Tensor");
  m.def("qdequant(Tensor packed, Tensor scales, Tensor szeros, Tensor codebook, int bits, int group_size, int in_features) -> Tensor");
  m.def("lut_gemv(Tensor x, Tensor packed, Tensor scales, Tensor szeros, int bits, int group_size, int out_features) -> Tensor");
  m.def("lut_dequant(Tensor packed, Tensor scales, Tensor szeros, int bits, int group_size, int out_features, int in_features) -> Tensor");
  m.def("int8_gemm(Tensor xq, Tensor wq) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor wq, Tensor wsum, Tensor w_scale, int a_qmax, bool per_token) -> Tensor");
  m.def("sparse24_dense(Tensor values, Tensor index, int in_features) -> Tensor");
  m.def("sparse24_matmul(Tensor x, Tensor values, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(shrink, CPU, m) {
  m.impl("qmatmul", &shrink::qmatmul);
  m.impl("qdequant", &shrink::qdequant);
  m.impl("lut_gemv", &shrink::lut_gemv);
  m.impl("lut_dequant", &shrink::lut_dequant);
  m.impl("int8_gemm", &shrink::int8_gemm);
  m.impl("w8a8_linear", &shrink::w8a8_linear);
  m.impl("sparse24_dense", &shrink::sparse24_dense);
  m.impl("sparse24_matmul", &shrink::sparse24_matmul);
}

// Direct Python bindings of the per-token kernels: torch.ops' dispatch costs ~2 us a call from
// Python, and a decoding model calls a kernel for every linear of every token (211 per token for
// SmolLM2). A compiled model calls the torch.ops.shrink.* operators instead.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &shrink::qmatmul);
  m.def("lut_gemv", &shrink::lut_gemv);
  m.def("w8a8_linear", &shrink::w8a8_linear);
  m.def("sparse24_matmul", &shrink::sparse24_matmul);
  m.def("lut_dequant_into", &shrink::lut_dequant_into);  // eager prefill: dequantize into a reused buffer
}
