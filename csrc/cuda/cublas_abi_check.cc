// Build-time check that the declarations in cublas_loader.h match the cuBLAS header: compiled
// (and nothing else) wherever CMake finds cublas_api.h. Any mismatch fails the build.
#include <cublas_api.h>

#include <type_traits>

#include "cublas_loader.h"

namespace tfcells {
namespace cublas {
namespace {

// The loader passes enums as int and the handle as an opaque pointer.
static_assert(sizeof(cublasStatus_t) == sizeof(Status), "cublasStatus_t is not an int");
static_assert(sizeof(cublasOperation_t) == sizeof(int), "cublasOperation_t is not an int");
static_assert(sizeof(cublasMath_t) == sizeof(int), "cublasMath_t is not an int");
static_assert(sizeof(cublasHandle_t) == sizeof(Handle), "cublasHandle_t is not a pointer");
static_assert(CUBLAS_STATUS_SUCCESS == kSuccess, "CUBLAS_STATUS_SUCCESS");
static_assert(CUBLAS_OP_N == kOpN && CUBLAS_OP_T == kOpT, "cublasOperation_t values");
static_assert(CUBLAS_DEFAULT_MATH == kDefaultMath, "CUBLAS_DEFAULT_MATH");
static_assert(CUBLAS_TF32_TENSOR_OP_MATH == kTf32TensorOpMath, "CUBLAS_TF32_TENSOR_OP_MATH");
static_assert(sizeof(cudaDataType) == sizeof(int) && CUDA_R_32F == kRealFloat32, "CUDA_R_32F");
static_assert(sizeof(cublasGemmAlgo_t) == sizeof(int) && CUBLAS_GEMM_DEFAULT == kGemmDefault,
              "CUBLAS_GEMM_DEFAULT");
static_assert(sizeof(cublasComputeType_t) == sizeof(int), "cublasComputeType_t is not an int");
static_assert(CUBLAS_COMPUTE_32F_FAST_16F == kCompute32FFast16F &&
                  CUBLAS_COMPUTE_32F_FAST_16BF == kCompute32FFast16BF,
              "cublasComputeType_t values");

// The real signatures, with cuBLAS' own types replaced by the ones the loader uses.
template <typename Real, typename Ours>
constexpr bool kSameShape = false;
template <typename R1, typename... A1, typename R2, typename... A2>
constexpr bool kSameShape<R1 (*)(A1...), R2 (*)(A2...)> =
    sizeof...(A1) == sizeof...(A2) &&
    ((sizeof(A1) == sizeof(A2) && std::is_pointer_v<A1> == std::is_pointer_v<A2> &&
      std::is_floating_point_v<std::remove_pointer_t<A1>> ==
          std::is_floating_point_v<std::remove_pointer_t<A2>> &&
      (!std::is_floating_point_v<std::remove_pointer_t<A1>> ||
       std::is_same_v<std::remove_cv_t<std::remove_pointer_t<A1>>,
                      std::remove_cv_t<std::remove_pointer_t<A2>>>)) && ...);

static_assert(kSameShape<decltype(&cublasCreate_v2), decltype(Api::create)>, "cublasCreate_v2");
static_assert(kSameShape<decltype(&cublasDestroy_v2), decltype(Api::destroy)>, "cublasDestroy_v2");
static_assert(kSameShape<decltype(&cublasGetVersion_v2), decltype(Api::get_version)>,
              "cublasGetVersion_v2");
static_assert(kSameShape<decltype(&cublasSetStream_v2), decltype(Api::set_stream)>,
              "cublasSetStream_v2");
static_assert(kSameShape<decltype(&cublasSetMathMode), decltype(Api::set_math_mode)>,
              "cublasSetMathMode");
static_assert(kSameShape<decltype(&cublasSetWorkspace_v2), decltype(Api::set_workspace)>,
              "cublasSetWorkspace_v2");
static_assert(kSameShape<decltype(&cublasSgemm_v2), decltype(Api::sgemm)>, "cublasSgemm_v2");
static_assert(kSameShape<decltype(&cublasDgemm_v2), decltype(Api::dgemm)>, "cublasDgemm_v2");
// The C++ header adds an inline overload taking a cudaDataType compute type: name the
// exported one, which takes a cublasComputeType_t.
using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                  int, const void*, const void*, cudaDataType, int, const void*,
                                  cudaDataType, int, const void*, void*, cudaDataType, int,
                                  cublasComputeType_t, cublasGemmAlgo_t);
static_assert(kSameShape<GemmEx, decltype(Api::gemm_ex)>, "cublasGemmEx");
constexpr GemmEx kGemmEx = &cublasGemmEx;  // fails to compile if the exported one differs
static_assert(std::is_same_v<decltype(&cublasGetStatusString), const char* (*)(cublasStatus_t)>,
              "cublasGetStatusString");

}  // namespace
}  // namespace cublas
}  // namespace tfcells
