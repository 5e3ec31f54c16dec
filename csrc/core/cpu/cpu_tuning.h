// Every tuning constant of the CPU backend, each with the reason for its value. Measured
// figures belong in the README and the benchmarks, not here. This header is compiled once per
// ISA level (csrc/core/cpu/cpu_kernels.cc), so a constant may differ by vector width.
#pragma once

#include <cstdint>

#include "../common.h"

namespace tfcells {
TFCELLS_ISA_BEGIN
namespace cpu_tuning {

// The same on every level: they weigh thread hand-offs, not vector units.

// A pointwise loop or column sum smaller than this runs on the calling thread: below it the
// hand-off to the pool costs more than the loop. Measured on the Intel Xeon VM (2 cores, where
// waking a pool thread is a wake-up of a halted vCPU; T=100, B=64, I=H=256, in-process A/B
// through TensorFlow): 65536 against 8192, which split the copies of the final states, 0.98-1.00x
// the time of every cell's inference and training step.
constexpr Index kMinParallelElements = 65536;
// Rows a batch shard needs: the packed step GEMM runs at full rate from this many rows on.
constexpr Index kMinShardRows = 8;
// With fewer rows than one shard per thread, a step of at least this many flops is split
// across the pool instead (per-step hand-offs then pay for themselves).
constexpr double kMaxShardedStepFlops = 16e6;
// A step whose weights fill at least this many times a core's L2 splits its units across the
// pool (CpuBackend::ForShards). Measured on the Intel Xeon (2 MiB L2, 2 cores; T=100, B=64,
// inference, alternating processes): LSTM with I=H=512 (8 MiB of weights) 0.96-0.98x the time
// of batch shards, but with I=H=256 (2 MiB) 1.03x and GRU (1.5 MiB) 1.10x: where the weights
// come from L3 fast enough, the per-step synchronisation and the exchange of h cost as much.
constexpr double kUnitSplitL2Share = 2.0;
// And only a step of at least this many flops: below it the per-step synchronisation (about a
// microsecond) would cost more than it saves.
constexpr double kMinUnitSplitStepFlops = 1e6;
// The products by W_x of several steps run back to back (CallOptions::projection_steps) only
// where the packed W_x and W_h together fill more than 1 / kProjectionL2Share of a core's L2:
// measured on the Intel Xeon (2 MiB L2; T=100, B=64, I=H=256), float32 LSTM and GRU (2 and
// 1.5 MiB) 0.95-0.96x the time of one step at a time, SimpleRNN (0.5 MiB) 1.00x, but the LSTM
// on bfloat16 pairs (1 MiB) 1.06x at inference: operands that share L2 gain nothing, and the
// projections' slots then leave it.
constexpr double kProjectionL2Share = 2.0;
// Below this many flops a GEMM runs on the calling thread: splitting it costs more in
// hand-offs than it saves.
constexpr double kMinParallelGemmFlops = 4e6;
// Split a large BLAS GEMM on multiples of these (rows of C / columns of C), so every piece
// keeps whole register blocks of the BLAS kernel.
constexpr Index kSplitRowAlign = 8, kSplitColAlign = 16;
// Rows of a dropout weight gradient's operands that a task packs at a time, and then multiplies
// (CpuBackend::MaskedGemms, step_gemm::ChunkProduct): a panel of 128 rows (16 KiB float32) stays
// in L1 beside the blocks of A streaming past it, Zen 4's 32 KiB L1 included.
constexpr Index kMaskedChunkRows = 128;
// And the parts its rows are summed in (each into its own sums, added up after): two, so that
// two cores each mask and pack only their own rows. Measured with OpenBLAS on the Intel Xeon
// (k = 6400 rows, m = n = 256, one core), before the products were tfcells' own: every row of
// 128 of C's rows 146 GFLOP/s, half the rows of all 256 166 (C's rows split across two tasks,
// each packed all of B again).
constexpr Index kMaskedRowParts = 2;
// Column sums split on multiples of this many columns: whole cache lines per task.
constexpr Index kColumnSumAlign = 16;

// For csrc/tf's CpuLauncher (TensorFlow's ParallelFor cost_per_unit): a cost so high that
// ParallelFor hands every task its own shard, never several tasks to one thread.
constexpr std::int64_t kPoolCostPerTask = 1'000'000'000;

// A step product copies each block of A's rows first (CpuBackend::CopiesRows) when A's row
// stride is a multiple of this many bytes, on a CPU whose L1 data cache has fewer ways than a
// block has rows (kStepRows). Such rows fall in one or two of L1's 64 sets, and then evict one
// another at every column of the block. Batch-major x has such a stride at most lengths
// (T * I * 4 bytes), and so have the LSTM's gate gradients (4H * 4 bytes, H a multiple of 128).
// Measured on Zen 4 (8 ways, 12-row blocks; T=100, B=64, I=H=256, in one process, alternating
// calls through TensorFlow): 0.79-1.00x the time of every cell's inference and training steps
// (LSTM inference 0.79). Intel's Xeon has 12 ways and keeps kNever (CpuBackend).
constexpr Index kRowSetBytes = 2048;

// The packed step GEMM's register blocking (step_gemm.h): kStepRows rows of A against a panel
// of kStepPanelVectors vectors of columns. kStepRows * kStepPanelVectors accumulators, the
// panel's vectors and one broadcast must fit the register file.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kStepRows = 12, kStepPanelVectors = 2;  // 32 zmm registers: 24 + 2 + 1
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kStepRows = 6, kStepPanelVectors = 2;  // 16 ymm registers: 12 + 2 + 1
#else
constexpr int kVectorBytes = 16;
constexpr int kStepRows = 6, kStepPanelVectors = 2;  // 16 xmm registers: 12 + 2 + 1
#endif

}  // namespace cpu_tuning
TFCELLS_ISA_END
}  // namespace tfcells
