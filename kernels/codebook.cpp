// 16-entry codebook weights (NF4, FP4 or any 16 floats) on the packed-int kernels: 4-bit indices
// in bit planes, v(q) = codebook[q] looked up in registers (two permutes and a blend per 8 weights
// on AVX2, one permute per 16 on AVX-512).
#include "packed_int.h"

namespace shrink {

QRowFn codebook_qrow_fn(int lvl) { return pick_qrow<4, true>(lvl); }
DqFn codebook_dq_fn(int lvl) { return pick_dq<4, true>(lvl); }

}  // namespace shrink
