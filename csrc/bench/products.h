// Inside the benchmark target: the products of one ISA level (products_kernels.cc, compiled
// once per level), as ProductsCpu (products.cc) calls them.
#pragma once

#include "../core/cpu/cpu_rnn.h"

namespace tfcells {

struct ProductsKernels {
  void (*f32)(Index count, bool trans_a, Index m, Index k, Index n, const float* a,
              const float* w, float* out, const CpuOptions& options);
  void (*f64)(Index count, bool trans_a, Index m, Index k, Index n, const double* a,
              const double* w, double* out, const CpuOptions& options);
};

}  // namespace tfcells
