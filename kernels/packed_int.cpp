// Packed integer weights (2, 3, 4, 8 bits): the dequantize-in-registers GEMV/GEMM (qmatmul) and the
// dequantization to float32 (qdequant) for large batches. The 16-entry codebooks (NF4, FP4) run in
// the same two operators through codebook.cpp.
#include "packed_int.h"

namespace shrink {

namespace {

QRowFn qrow_fn(int bits, bool cb, int lvl) {
  if (cb) return codebook_qrow_fn(lvl);
  switch (bits) {
    case 2: return pick_qrow<2, false>(lvl);
    case 3: return pick_qrow<3, false>(lvl);
    case 4: return pick_qrow<4, false>(lvl);
    case 8: return pick_qrow<8, false>(lvl);
  }
  TORCH_CHECK(false, "qmatmul supports bits 2, 3, 4, 8; got ", bits);
}


DqFn dq_fn(int bits, bool cb, int lvl) {
  if (cb) return codebook_dq_fn(lvl);
  switch (bits) {
    case 2: return pick_dq<2, false>(lvl);
    case 3: return pick_dq<3, false>(lvl);
    case 4: return pick_dq<4, false>(lvl);
    case 8: return pick_dq<8, false>(lvl);
  }
  TORCH_CHECK(false, "qdequant supports bits 2, 3, 4, 8; got ", bits);
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

}  // namespace

// Above this many rows of x, qmatmul dequantizes the weight and calls the BLAS (dequant_matmul).
constexpr int GEMV_MAX_ROWS = 4;

// x (..., K) float32 -> y (..., N).
at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& szeros, const at::Tensor& codebook, int64_t bits, int64_t gi) {
  check_qargs(packed, scales, szeros, codebook, bits, gi);
  std::vector<int64_t> out_shape;
  const at::Tensor x = rows_of(x_in, packed.size(0), out_shape);
  const int M = x.size(0), K = x.size(1), N = packed.size(0), G = scales.size(1), Kp = G * gi;
  TORCH_CHECK(K <= Kp && K > Kp - gi, "x has ", K, " features; the packed weight has ", G, " groups of ", gi);
  at::Tensor xp = K == Kp ? x : at::constant_pad_nd(x, {0, Kp - K});
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  const float* pcb = codebook.numel() ? codebook.data_ptr<float>() : nullptr;
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const int64_t rb = packed.size(1);
  if (M > GEMV_MAX_ROWS) {
    DqFn dq = dq_fn(bits, codebook.numel() > 0, level());
    return dequant_matmul(xp, N, [&](int64_t o0, int64_t o1, float* w) {
      for (int64_t o = o0; o < o1; ++o) dq(pk + o * rb, ps + o * G, psz + o * G, G, gi, pcb, w + (o - o0) * Kp);
    }).view(out_shape);
  }
  at::Tensor xs = xp.view({M, G, gi}).sum(2).contiguous();  // (M, G) sums of x per group
  at::Tensor y = at::empty({M, N}, x.options());
  QRowFn fn = qrow_fn(bits, codebook.numel() > 0, level());
  const float* px = xp.data_ptr<float>();
  float *py = y.data_ptr<float>(), *pxs = xs.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) fn(px, M, Kp, pk + o * rb, ps + o * G, psz + o * G, pxs, G, gi, pcb, py, N, o);
  });
  return y.view(out_shape);
}


// Dequantize into W (N, >= Kp) float32 with contiguous rows (a buffer reused across calls: a fresh
// weight-sized allocation costs a page fault per 4 KiB on every call); columns >= Kp are left alone.
void qdequant_into(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                   const at::Tensor& codebook, int64_t bits, int64_t gi, const at::Tensor& W) {
  check_qargs(packed, scales, szeros, codebook, bits, gi);
  const int N = packed.size(0), G = scales.size(1), Kp = G * gi;
  TORCH_CHECK(W.scalar_type() == at::kFloat && W.dim() == 2 && W.size(0) == N && W.size(1) >= Kp && W.stride(1) == 1,
              "the buffer must be float32 (", N, ", >= ", Kp, ") with contiguous rows");
  DqFn fn = dq_fn(bits, codebook.numel() > 0, level());
  const f16 *ps = scales.data_ptr<f16>(), *psz = szeros.data_ptr<f16>();
  const float* pcb = codebook.numel() ? codebook.data_ptr<float>() : nullptr;
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  float* pw = W.data_ptr<float>();
  const int64_t rb = packed.size(1), ldw = W.stride(0);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) fn(pk + o * rb, ps + o * G, psz + o * G, G, gi, pcb, pw + o * ldw);
  });
}

at::Tensor qdequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros,
                    const at::Tensor& codebook, int64_t bits, int64_t gi, int64_t K) {
  const int64_t Kp = scales.size(1) * gi;
  TORCH_CHECK(K <= Kp && K > Kp - gi, "in_features ", K, " does not match ", scales.size(1), " groups of ", gi);
  at::Tensor W = at::empty({packed.size(0), Kp}, scales.options().dtype(at::kFloat));
  qdequant_into(packed, scales, szeros, codebook, bits, gi, W);
  return K == Kp ? W : W.narrow(1, 0, K).contiguous();
}

}  // namespace shrink
