// Host-only helpers of the CUDA path.
#include <cstdint>

#include "constants.h"
#include "cublas_loader.h"
#include "cuda_rnn.h"

namespace tfcells {

std::string CudaBlasLibrary(bool* ok) {
  std::string error;
  const cublas::Api* api = cublas::Load(&error);
  *ok = api != nullptr;
  return api ? api->library : error;
}

namespace {
std::string ErrorText(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}
}  // namespace

std::string CublasWorkspaceBytes(int device, std::size_t* bytes) {
  int major = 0;
  const cudaError_t e =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky; clear it for the caller's next check
    return "cannot read the compute capability of GPU " + std::to_string(device) + ": " +
           ErrorText(e);
  }
  *bytes = major >= cuda_constants::kHopperMajor ? cuda_constants::kCublasWorkspaceBytesHopper
                                                 : cuda_constants::kCublasWorkspaceBytesOther;
  return "";
}

std::string UseBlasWorkspace(void* base, std::size_t bytes, std::size_t need,
                             CudaOptions* options) {
  constexpr std::uintptr_t kAlign = cuda_constants::kCublasWorkspaceAlignment;
  const auto at = reinterpret_cast<std::uintptr_t>(base);
  const std::uintptr_t start = (at + kAlign - 1) / kAlign * kAlign;
  if (base == nullptr || bytes < start - at + need)
    return "the cuBLAS workspace must hold " + std::to_string(need) +
           " bytes from its first 256-byte boundary on (" +
           std::to_string(BlasWorkspaceAllocation(need)) + " bytes suffice), got " +
           std::to_string(bytes);
  options->blas_workspace = reinterpret_cast<void*>(start);
  options->blas_workspace_bytes = need;
  return "";
}

std::size_t BlasWorkspaceAllocation(std::size_t need) {
  return need + cuda_constants::kCublasWorkspaceAlignment - 1;
}

std::string CudaDevices(int* driver_version, int* runtime_version, int* count) {
  *driver_version = *runtime_version = *count = 0;
  cudaDriverGetVersion(driver_version);  // 0 when no driver is installed
  cudaRuntimeGetVersion(runtime_version);
  const cudaError_t e = cudaGetDeviceCount(count);
  cudaGetLastError();
  // No GPU: a machine without the driver, or a driver that sees no device. Anything else is a
  // GPU set-up that is broken (e.g. a driver older than this runtime needs) and must say so.
  if (e == cudaSuccess) return "";
  *count = 0;
  if (e == cudaErrorNoDevice || *driver_version == 0) return "";
  return "CUDA cannot count the GPUs: " + ErrorText(e) + " (driver supports CUDA " +
         std::to_string(*driver_version / 1000) + "." +
         std::to_string(*driver_version % 1000 / 10) + ", tfcells' runtime is CUDA " +
         std::to_string(*runtime_version / 1000) + "." +
         std::to_string(*runtime_version % 1000 / 10) + ")";
}

}  // namespace tfcells
