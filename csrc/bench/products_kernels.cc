// The GEMM floor's products at one ISA level (compiled once per level, as
// csrc/core/cpu/cpu_kernels.cc is): through the backend, sharding and split rules the ops use.
#include <algorithm>
#include <type_traits>

#include "../core/cpu/cpu_backend.h"
#include "../core/cpu/cpu_dispatch.h"
#include "products.h"

namespace tfcells {
TFCELLS_ISA_BEGIN
namespace {

template <typename T>
void Products(Index count, bool trans_a, Index m, Index k, Index n, const T* a, const T* w,
              T* out, const CpuOptions& options, bool split_units, bool bf16_pairs) {
  CpuBackend be;
  be.runner = options.runner;
  be.max_tasks = options.max_tasks;
  be.pin_shards = options.pin_shards;  // as the ops' time loops
  be.row_copies = CpuBackend::ResolveRowCopies(options.row_copies);
  // As MakeBackend sets them for a bfloat16 call (pairs are float32's only).
  be.bf16_products = be.bf16_gemms = std::is_same_v<T, float> && bf16_pairs;
  if (count == 1) return be.Gemm(trans_a, false, m, n, k, a, trans_a ? m : k, w, n, T(0), out, n);
  const auto operand = be.StepOperand(false, k, n, w, n);
  // split_units: the ops' unit split (whole panels), forced, never waiting.
  be.split_units = split_units;
  be.l2_cache_bytes = 1;
  const StepWork work{2.0 * m * k * n, k * n * Index(sizeof(T)), true};
  be.ForShards(m, n, count, work,
               [&](CpuBackend& sb, Index b0, Index b1, Units u, Index t, const auto&) {
                 sb.StepGemm(b1 - b0, a + (t * m + b0) * k, k, operand, T(0), out + b0 * n, n,
                             n, u);
               });
}

}  // namespace
TFCELLS_ISA_END

const ProductsKernels& TFCELLS_LEVEL_NAME(ProductsKernelsOf_, TFCELLS_ISA)() {
  static constexpr ProductsKernels kKernels = {&Products<float>, &Products<double>};
  return kKernels;
}

}  // namespace tfcells
