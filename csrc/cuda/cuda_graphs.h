// Whole-call CUDA graphs. A call enqueues hundreds of launches (per time step a GEMM, often
// with a split-K reduction, and a pointwise kernel, in each direction); where each step's work
// is small the host's launches, not the GPU, set the pace (an H200 ran 16-bit and TF32 steps
// at 30-45 us per step of host launches while its kernels were busy half that time). So a call
// is captured once into a CUDA graph and replayed, one launch, while it repeats with the same
// shapes and buffers, as a training loop does.
//
// A call is named by a GraphKey: `shape`, everything that fixes the sequence of launches
// except addresses (the plan's options and sizes, the products' type, which buffers are
// present, the device), and `buffers`, every address the call reads or writes. The same key
// replays its graph. The same shape with other buffers is captured again and updates one of
// that shape's executable graphs in place (cudaGraphExecUpdate, cheaper than instantiating)
// once the shape holds kMaxGraphsPerShape of them, so that the few buffer sets a model cycles
// through (the layers of a stack, several calls per step) each keep theirs.
//
// Capture runs on a private stream of the calling thread in thread-local capture mode, so work
// other threads enqueue meanwhile (on the caller's stream too) is never captured; the graph is
// then launched on the caller's stream, where the direct launches would have gone, so it is
// ordered the same. A capture that fails runs the call directly; where that direct run succeeds
// (so it was the capture that failed, on an operation capture does not allow) its shape is
// never captured again. A caller that is itself capturing the stream gets direct launches.
//
// Only calls given a cuBLAS workspace of their own (CudaOptions::blas_workspace, which the
// TensorFlow op always passes) are captured: cuBLAS' default workspace belongs to the handle,
// so graphs captured with it would all use the capture stream's one, also where two of them
// run at once on two streams.
//
// TFCELLS_CUDA_GRAPHS=0 in the environment launches every call directly (read at each call).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace tfcells {
namespace cuda_graphs {

struct GraphKey {
  std::string shape, buffers;

  // Appends the bytes of a value (an integer, an enum, a bool) to `shape`.
  template <typename V>
  void Shape(V v) {
    static_assert(std::is_trivially_copyable<V>::value && !std::is_pointer<V>::value, "");
    shape.append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  // Appends an address to `buffers`, and whether it is null (which changes what runs) to
  // `shape`.
  void Buffer(const void* p) {
    Shape(p != nullptr);
    buffers.append(reinterpret_cast<const char*>(&p), sizeof(p));
  }
};

// A call on a stream, in two parts: Prepare(stream) sets up what launching on it needs, outside
// any capture (a library handle: its creation allocates memory, which a capture does not
// allow); Enqueue() then enqueues the work. Each returns "" or the error.
class Call {
 public:
  virtual ~Call() = default;
  virtual std::string Prepare(cudaStream_t stream) = 0;
  virtual std::string Enqueue() = 0;
};

// Runs the call named `key` on `stream`: a replay of its graph, a new capture of `call` then
// launched as a graph, or `call` directly (graphs off, !capturable, or the shape never
// captures). Returns "" or the error.
std::string Run(GraphKey key, bool capturable, cudaStream_t stream, Call& call);

struct Stats {
  std::int64_t replays = 0;         // calls run by launching a cached graph as it was
  std::int64_t instantiations = 0;  // captures that became a new executable graph
  std::int64_t updates = 0;         // captures that updated a cached executable graph
  std::int64_t direct = 0;          // calls launched kernel by kernel
  std::int64_t failed_captures = 0;  // captures that failed (their shape then runs directly)
  std::int64_t cached = 0;          // executable graphs held now
  std::string last_failure;         // why the last failed capture failed
};
Stats GetStats();

}  // namespace cuda_graphs
}  // namespace tfcells
