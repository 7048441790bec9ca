// SIMD dispatch: the best path of this CPU, and the path in use (forced lower for tests with
// set_simd_level, or for a whole run through $SHRINKLIB_SIMD in shrinklib.kernels).
#include "common.h"

namespace shrink {

namespace {
int g_max = -1, g_level = -1;
}

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


}  // namespace shrink
