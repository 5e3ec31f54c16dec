// Host-only helpers of the CUDA path.
#include "cublas_loader.h"
#include "cuda_rnn.h"

namespace tfcells {

std::string CudaBlasLibrary(bool* ok) {
  std::string error;
  const cublas::Api* api = cublas::Load(&error);
  *ok = api != nullptr;
  return api ? api->library : error;
}

}  // namespace tfcells
