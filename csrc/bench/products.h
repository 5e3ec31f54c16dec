// The benchmark target's products: ProductsCpu for the GEMM floor, and the kernels of one ISA
// level (products_kernels.cc, compiled once per level) that it calls.
#pragma once

#include "../core/cpu/cpu_rnn.h"

namespace tfcells {

// Benchmark-only (products.cc; only the _tfcells_core module links this target). A step's GEMMs
// alone, as the CPU backend runs them inside the ops, on `threads` warm worker threads: the
// benchmark's GEMM floor times them. out[m, n] = op(a[t])·w for t = 0..count-1, with w [k, n]
// and a [count, m, k] (trans_a: a [1, k, m], read transposed), all row-major.
//   count == 1: one large GEMM split across the threads (the input projection, dx, dW);
//   count > 1:  the recurrence's per-step products (no trans_a): w packed once, then batch
//               shards or split steps, by the ops' own rules; with split_units, each step's
//               columns split across the threads instead, as the ops split a step's units
//               (whole panels; with no synchronisation between steps: products alone).
// bf16_pairs (float only; ignored for double): on bfloat16 pairs, as a bfloat16 call's products
// run where CpuBf16Products(): w packed as pairs, each block of a's rows rounded to pairs,
// float32 sums.
void ProductsCpu(Index count, bool trans_a, Index m, Index k, Index n, const float* a,
                 const float* w, float* out, int threads, bool split_units, bool bf16_pairs);
void ProductsCpu(Index count, bool trans_a, Index m, Index k, Index n, const double* a,
                 const double* w, double* out, int threads, bool split_units, bool bf16_pairs);

struct ProductsKernels {
  void (*f32)(Index count, bool trans_a, Index m, Index k, Index n, const float* a,
              const float* w, float* out, const CpuOptions& options, bool split_units,
              bool bf16_pairs);
  void (*f64)(Index count, bool trans_a, Index m, Index k, Index n, const double* a,
              const double* w, double* out, const CpuOptions& options, bool split_units,
              bool bf16_pairs);
};

}  // namespace tfcells
