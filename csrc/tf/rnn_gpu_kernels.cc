// GPU kernels of the fused recurrent ops, in their own library (_tfcells_gpu_ops.so) that is
// loaded only when the running TensorFlow is a CUDA build, after _tfcells_ops.so (which
// registers the ops themselves: this file only registers kernels).
//
// The kernels are the shared OpKernels of rnn_kernels.h: they validate inputs and allocate
// outputs and scratch through TensorFlow's allocator; GpuLauncher then enqueues the core's CUDA
// path on the op's own stream, on the op's device. cuBLAS' workspace is a temporary of the op
// too (cublasSetWorkspace): under TensorFlow's default up-front reservation of the GPU's
// memory, a workspace cuBLAS allocated itself could fail. Nothing synchronises the device.
#include "../cuda/cuda_rnn.h"
#include "rnn_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tsl/platform/tensor_float_32_utils.h"
#include "xla/stream_executor/stream.h"
#include "xla/stream_executor/stream_executor.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace tfcells {
namespace {

// float32 GEMMs on TF32 tensor cores exactly when TensorFlow runs its own float32 GEMMs and
// Keras' cuDNN layers there (tf.config.experimental.enable_tensor_float_32_execution, on by
// default): a layer swapped for tfcells' then computes in the same precision, and on Hopper
// TF32 halves the LSTM's step (H200). TFCELLS_CUDA_TF32=1 / =0, or
// tfcells_gpu_set_allow_tf32(1 / 0), decides for tfcells' kernels alone; -1 (or the variable
// unset or empty) follows TensorFlow again.
std::atomic<int>& Tf32Override() {
  static std::atomic<int> value{[] {
    const char* env = std::getenv("TFCELLS_CUDA_TF32");
    if (env == nullptr || *env == '\0') return -1;
    return std::strcmp(env, "1") == 0 ? 1 : 0;
  }()};
  return value;
}

bool AllowTf32() {
  const int value = Tf32Override().load();
  return value >= 0 ? value == 1 : tsl::tensor_float_32_execution_enabled();
}

// The op's CUDA stream and device (TensorFlow's GetGpuStream, without the header that needs
// nvcc).
tensorflow::Status OpStream(tensorflow::OpKernelContext* ctx, cudaStream_t* stream,
                            int* device) {
  tensorflow::DeviceContext* dc = ctx->op_device_context();
  stream_executor::Stream* s = dc ? dc->stream() : nullptr;
  if (s == nullptr)
    return tensorflow::errors::Internal("tfcells: the op has no GPU stream (is it placed on ",
                                        "a GPU?)");
  *stream = reinterpret_cast<cudaStream_t>(s->platform_specific_handle().stream);
  *device = s->parent() ? s->parent()->device_ordinal() : -1;
  if (*stream == nullptr)
    return tensorflow::errors::Internal("tfcells: the op's stream has no CUDA handle");
  return tensorflow::OkStatus();
}

// Runs `enqueue` with the op's device current (TensorFlow usually has it current already),
// restoring the caller's device afterwards.
template <typename F>
void OnOpDevice(tensorflow::OpKernelContext* ctx, const char* what, F enqueue) {
  cudaStream_t stream = nullptr;
  int device = -1;
  OP_REQUIRES_OK(ctx, OpStream(ctx, &stream, &device));
  CudaOptions options;
  options.allow_tf32 = AllowTf32();
  // cuBLAS' workspace from TensorFlow's allocator (ordered on the op's stream like any temp),
  // before the device switch below so that an error leaves the caller's device alone.
  int current = device;
  if (current < 0) cudaGetDevice(&current);
  std::size_t need = 0;
  const std::string size_error = CublasWorkspaceBytes(current, &need);
  OP_REQUIRES(ctx, size_error.empty(), tensorflow::errors::Internal("tfcells: ", size_error));
  const std::size_t bytes = BlasWorkspaceAllocation(need);  // room to align
  tensorflow::Tensor workspace;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8,
                                         tensorflow::TensorShape({static_cast<std::int64_t>(
                                             bytes)}),
                                         &workspace));
  const std::string workspace_error = UseBlasWorkspace(
      const_cast<char*>(workspace.tensor_data().data()), bytes, need, &options);
  OP_REQUIRES(ctx, workspace_error.empty(),
              tensorflow::errors::Internal("tfcells: ", workspace_error));
  int previous = -1;
  if (device >= 0) {
    cudaError_t e = cudaGetDevice(&previous);
    if (e == cudaSuccess && previous != device) e = cudaSetDevice(device);
    OP_REQUIRES(ctx, e == cudaSuccess,
                tensorflow::errors::Internal("tfcells: cannot select GPU ", device, ": ",
                                             cudaGetErrorString(e)));
  }
  const std::string error = enqueue(stream, options);
  if (device >= 0 && previous >= 0 && previous != device) cudaSetDevice(previous);
  OP_REQUIRES(ctx, error.empty(),
              tensorflow::errors::Internal(ctx->op_kernel().name(), ": ", what, ": ", error));
}

struct GpuLauncher {
  static constexpr InputProjection kInputProjection = kCudaInputProjection;
  static constexpr Index kProjectionSteps = 1;  // (read only for kPerStep)
  // TensorFlow's GPU allocator (BFC) reuses its memory already: nothing to keep.
  static constexpr bool kKeepsBuffers = false;

  template <typename T, typename S>
  static void Forward(tensorflow::OpKernelContext* ctx, const ForwardArgs<T, S>& a) {
    OnOpDevice(ctx, "CUDA forward pass", [&](cudaStream_t stream, const CudaOptions& options) {
      return ForwardCuda(a, stream, options);
    });
  }
  template <typename T, typename S>
  static void Backward(tensorflow::OpKernelContext* ctx, const BackwardArgs<T, S>& a) {
    OnOpDevice(ctx, "CUDA backward pass", [&](cudaStream_t stream, const CudaOptions& options) {
      return BackwardCuda(a, stream, options);
    });
  }
};

TFCELLS_REGISTER_KERNELS(tensorflow::DEVICE_GPU, GpuLauncher)

}  // namespace
}  // namespace tfcells

#define TFCELLS_EXPORT extern "C" __attribute__((visibility("default")))

// Read by tfcells through ctypes: the work counters of this library's copy of the core (the
// CPU library has its own; add the two), as tfcells_work_counters writes them.
TFCELLS_EXPORT int tfcells_gpu_work_counters(std::int64_t* out, int n) {
  if (n != tfcells::kNumCounters) return -1;
  for (int i = 0; i < n; ++i) out[i] = tfcells::WorkCount(static_cast<tfcells::Counter>(i));
  return n;
}

// 1: TF32 on, 0: off, for tfcells' kernels alone; -1: as TensorFlow's own GEMMs (the default).
TFCELLS_EXPORT void tfcells_gpu_set_allow_tf32(int allow) {
  tfcells::Tf32Override().store(allow < 0 ? -1 : (allow != 0 ? 1 : 0));
}
// Whether the next op call multiplies float32 on TF32 tensor cores.
TFCELLS_EXPORT int tfcells_gpu_allow_tf32() { return tfcells::AllowTf32() ? 1 : 0; }

// Which cuBLAS the GPU kernels use; writes a NUL-terminated path (or the reason none loads)
// into buf and returns 1 if one loaded, 0 if not.
TFCELLS_EXPORT int tfcells_gpu_cublas_library(char* buf, int size) {
  bool ok = false;
  const std::string what = tfcells::CudaBlasLibrary(&ok);
  if (buf != nullptr && size > 0) {
    const size_t n = std::min<size_t>(what.size(), size_t(size) - 1);
    std::memcpy(buf, what.data(), n);
    buf[n] = '\0';
  }
  return ok ? 1 : 0;
}
