// Every tuning constant of the CUDA path, each with why it has its value. Host-only (no CUDA
// headers), so that host code and tests can read them too.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tfcells {
namespace cuda_constants {

// Pointwise kernels (cuda_backend.cuh, ForEachKernel): threads per block. 256 = 8 warps, a
// multiple of every GPU's warp size that keeps several blocks resident per SM at any register
// count the cell functors need.
constexpr int kPointwiseThreads = 256;

// Pointwise kernels: at most this many blocks; larger problems grid-stride. 8192 blocks of 256
// threads cover every per-step [B, G·H] matrix of the benchmark shapes in one pass and leave
// launch size bounded for T·B-row problems.
constexpr std::int64_t kMaxPointwiseBlocks = 8192;

// Pointwise kernels: below this many elements the index arithmetic runs in 32 bits (faster
// division); UINT_MAX / 2 leaves headroom for `i + stride` not to wrap.
constexpr unsigned long long kMax32BitElements = 0xFFFFFFFFull / 2;

// Column sums (bias gradient, ColumnSumKernel): a block owns 32 columns, one per lane of a
// warp, so that each row's read is one coalesced 128-byte (float) transaction.
constexpr int kSumCols = 32;

// Column sums: 16 warps per block stride over the rows, then add 16 partial sums per column in
// shared memory: 512 threads, enough rows in flight to hide memory latency.
constexpr int kSumRowLanes = 16;

// cuBLAS workspace that tfcells hands to cuBLAS (cublasSetWorkspace) when the caller's allocator
// provides it (the TensorFlow GPU op): NVIDIA's recommended sizes, 32 MiB on Hopper (compute
// capability 9.x) and later, 4 MiB before it.
constexpr std::size_t kCublasWorkspaceBytesHopper = std::size_t(32) << 20;
constexpr std::size_t kCublasWorkspaceBytesOther = std::size_t(4) << 20;
constexpr int kHopperMajor = 9;

// cuBLAS requires the workspace pointer to be aligned to 256 bytes.
constexpr std::size_t kCublasWorkspaceAlignment = 256;

// Whole-call CUDA graphs (cuda_graphs.h): executable graphs kept per shape before a new buffer
// set updates the least recently used of them in place, and in all (then the least recently
// used is destroyed). 8 covers a stack's layers with their forward and backward calls; a graph
// of a 100-step call holds some 600 nodes, a few hundred KiB of host memory.
constexpr int kMaxGraphsPerShape = 8;
constexpr int kMaxGraphs = 64;

}  // namespace cuda_constants
}  // namespace tfcells
