// cuBLAS, loaded at run time.
//
// The CUDA toolkit that builds tfcells may ship nvcc and the runtime without cuBLAS (the
// project's CPU machines and CI do), and the process that loads tfcells usually has a cuBLAS
// already: TensorFlow's, PyTorch's or CuPy's, often of another major version than the toolkit
// that compiled tfcells. So tfcells does not link cuBLAS: on first use it takes the cuBLAS that
// is already loaded in the process, else the one named by $TFCELLS_CUBLAS_LIBRARY, else
// libcublas.so.{13,12,11} from the library search path. Only these few entry points are used,
// whose C ABI has not changed from cuBLAS 11 to 13; cublas_abi_check.cc checks the declarations
// below against cublas_api.h at build time wherever that header is found.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

namespace tfcells {
namespace cublas {

struct Context;  // cublasContext
using Handle = Context*;
using Status = int;  // cublasStatus_t; 0 is CUBLAS_STATUS_SUCCESS

constexpr Status kSuccess = 0;
constexpr int kOpN = 0;             // CUBLAS_OP_N
constexpr int kOpT = 1;             // CUBLAS_OP_T
constexpr int kDefaultMath = 0;     // CUBLAS_DEFAULT_MATH: exact float32
constexpr int kTf32TensorOpMath = 3;  // CUBLAS_TF32_TENSOR_OP_MATH
constexpr int kRealFloat32 = 0;       // CUDA_R_32F (cudaDataType)
constexpr int kGemmDefault = -1;      // CUBLAS_GEMM_DEFAULT (cublasGemmAlgo_t)
// cublasComputeType_t: float32 accumulation of operands rounded to 16 bits on the way in.
constexpr int kCompute32FFast16F = 74;   // CUBLAS_COMPUTE_32F_FAST_16F
constexpr int kCompute32FFast16BF = 75;  // CUBLAS_COMPUTE_32F_FAST_16BF

struct Api {
  Status (*create)(Handle*);
  Status (*destroy)(Handle);
  Status (*get_version)(Handle, int*);
  Status (*set_stream)(Handle, cudaStream_t);
  Status (*set_math_mode)(Handle, int);
  // cublasSetWorkspace_v2 (required; a cuBLAS without it is refused with its name): GEMMs then
  // use the caller's buffer, not one cuBLAS allocates. cublasSetStream resets it: set it after.
  Status (*set_workspace)(Handle, void*, size_t);
  const char* (*status_string)(Status);  // null in cuBLAS < 11.4
  Status (*sgemm)(Handle, int, int, int, int, int, const float*, const float*, int, const float*,
                  int, const float*, float*, int);
  Status (*dgemm)(Handle, int, int, int, int, int, const double*, const double*, int,
                  const double*, int, const double*, double*, int);
  // cublasGemmEx (cuBLAS >= 11 takes a cublasComputeType_t): float32 GEMMs whose operands
  // the tensor cores read rounded to 16 bits (the kCompute32FFast* types).
  Status (*gemm_ex)(Handle, int, int, int, int, int, const void*, const void*, int, int,
                    const void*, int, int, const void*, void*, int, int, int, int);
  std::string library;  // file it was loaded from
};

// Loads cuBLAS once per process (thread-safe). Returns null and sets *error when no usable
// cuBLAS is found; later calls return the same result.
const Api* Load(std::string* error);

// The handle of this thread for `device` (the current device) and `stream`, created on first
// use and destroyed when the thread exits. One handle per stream: a handle's default workspace
// must not serve two streams at once, which one thread driving two streams would otherwise do.
// Returns null and sets *error on failure.
Handle ThreadHandle(const Api& api, int device, cudaStream_t stream, std::string* error);

std::string StatusString(const Api& api, Status status);

}  // namespace cublas
}  // namespace tfcells
