# CUDA part of the build (csrc/cuda, the TensorFlow GPU kernel library, the _tfcells_cuda
# module). Included from CMakeLists.txt; sets TFCELLS_CUDA to ON when the CUDA code is built.
#
#   TFCELLS_WITH_CUDA=AUTO  (default) build it when nvcc is found, else skip it with a message
#   TFCELLS_WITH_CUDA=ON    require it: fail the configure step when nvcc is missing
#   TFCELLS_WITH_CUDA=OFF   never build it
#
# Only nvcc and the CUDA runtime are needed to build: cuBLAS is loaded at run time
# (csrc/cuda/cublas_loader.h).
#
# Driver requirement: the CUDA runtime is linked statically (the modules are self-contained and
# never bind, by soname, a libcudart of another minor version than the framework's), so the
# NVIDIA driver must support the CUDA major version of the nvcc that built tfcells (13: driver
# 580 or newer; 12: 525 or newer). Beside a CUDA build of TensorFlow, tfcells' CUDA major must
# be TensorFlow's: the GPU kernel library is not built (here) or not loaded (_loader.py) when
# they differ; build with that CUDA's nvcc (CMAKE_CUDA_COMPILER or CUDACXX). Targets: CUDA_ARCHITECTURES below (default sm_80 and sm_90
# machine code plus compute_90 PTX for newer GPUs); override with -DCMAKE_CUDA_ARCHITECTURES.

set(TFCELLS_WITH_CUDA AUTO CACHE STRING "Build the CUDA kernels: AUTO (when nvcc is found), ON, OFF")
set_property(CACHE TFCELLS_WITH_CUDA PROPERTY STRINGS AUTO ON OFF)
option(TFCELLS_CUDA_BUILD_TF_GPU_OPS
       "Build the TensorFlow GPU kernel library _tfcells_gpu_ops (needs TFCELLS_BUILD_TF_OPS)" ON)

set(TFCELLS_CUDA OFF)
set(TFCELLS_CUDA_VERSION "")
set(_tfcells_cuda_mode "${TFCELLS_WITH_CUDA}")
string(TOUPPER "${_tfcells_cuda_mode}" _tfcells_cuda_mode)

if(NOT _tfcells_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER)
    check_language(CUDA)
  endif()
  if(NOT CMAKE_CUDA_COMPILER)
    if(_tfcells_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR "TFCELLS_WITH_CUDA=ON but no CUDA compiler (nvcc) was found; put "
                          "nvcc on PATH or set CMAKE_CUDA_COMPILER")
    endif()
    message(STATUS "tfcells: no CUDA compiler found, building without the CUDA kernels")
  else()
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
    endif()
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(TFCELLS_CUDA ON)
    set(TFCELLS_CUDA_VERSION "${CMAKE_CUDA_COMPILER_VERSION}")
    message(STATUS "tfcells: building the CUDA kernels with nvcc ${CMAKE_CUDA_COMPILER_VERSION} "
                   "for ${CMAKE_CUDA_ARCHITECTURES}")
  endif()
endif()

if(TFCELLS_CUDA)
  # --- framework-free CUDA backend (static, position-independent, symbols hidden) ------------
  # plan.cc is compiled here again rather than taken from tfcells_core, so that none of
  # tfcells_core's flags (per-level ISA flags, sanitizers) or its OpenBLAS reach these targets.
  add_library(tfcells_cuda STATIC
    csrc/cuda/cuda_rnn_f32.cu
    csrc/cuda/cuda_rnn_f64.cu
    csrc/cuda/cuda_rnn_f16.cu
    csrc/cuda/cublas_loader.cc
    csrc/cuda/cuda_info.cc
    csrc/cuda/cuda_graphs.cc
    csrc/core/plan.cc)
  set_target_properties(tfcells_cuda PROPERTIES
    CUDA_RUNTIME_LIBRARY Static
    CXX_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
  target_compile_options(tfcells_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3 -Xcompiler=-Wall,-Wextra>
    $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall -Wextra>)
  target_include_directories(tfcells_cuda PUBLIC ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(tfcells_cuda PUBLIC CUDA::cudart_static ${CMAKE_DL_LIBS})

  # Checks cublas_loader.h against cuBLAS' own header, where one is found: the toolkit's, or
  # the nvidia-cublas wheel's (TFCELLS_CUBLAS_INCLUDE_DIR to point elsewhere).
  set(_tfcells_cublas_hints ${CUDAToolkit_INCLUDE_DIRS})
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import nvidia, os; print(';'.join(os.path.join(p, s, 'include') for p in nvidia.__path__ for s in ('cu13', 'cublas', 'cu12')))"
    OUTPUT_VARIABLE _tfcells_wheel_hints OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  find_path(TFCELLS_CUBLAS_INCLUDE_DIR cublas_api.h
            HINTS ${_tfcells_cublas_hints} ${_tfcells_wheel_hints} NO_DEFAULT_PATH)
  if(TFCELLS_CUBLAS_INCLUDE_DIR)
    message(STATUS "tfcells: checking the cuBLAS declarations against ${TFCELLS_CUBLAS_INCLUDE_DIR}")
    add_library(tfcells_cublas_abi_check OBJECT csrc/cuda/cublas_abi_check.cc)
    target_include_directories(tfcells_cublas_abi_check PRIVATE
      ${TFCELLS_CUBLAS_INCLUDE_DIR} ${CUDAToolkit_INCLUDE_DIRS})
    add_dependencies(tfcells_cuda tfcells_cublas_abi_check)
  else()
    message(STATUS "tfcells: no cublas_api.h found; the cuBLAS declarations are not checked")
  endif()

  # --- pybind11 module over device memory ---------------------------------------------------
  pybind11_add_module(_tfcells_cuda MODULE csrc/py/cuda_module.cc)
  target_link_libraries(_tfcells_cuda PRIVATE tfcells_cuda)
  # Where pip puts cuBLAS (nvidia-cublas-cu12, nvidia-cublas for CUDA 13), relative to an
  # installed tfcells: searched by the loader's dlopen when no cuBLAS is loaded yet.
  set(_tfcells_cublas_rpath "$ORIGIN/../nvidia/cublas/lib;$ORIGIN/../nvidia/cu13/lib")
  set_target_properties(_tfcells_cuda PROPERTIES INSTALL_RPATH "${_tfcells_cublas_rpath}")
  install(TARGETS _tfcells_cuda LIBRARY DESTINATION tfcells)

  # --- TensorFlow GPU kernels ------------------------------------------------------------------
  # Compiled against the installed TensorFlow's headers, tensorflow-cpu's included (they hold
  # every declaration a kernel registration needs); loaded only by a CUDA build of TensorFlow.
  # A CUDA build of TensorFlow names its CUDA version; tensorflow-cpu names none (then the
  # library is built all the same, so that CI keeps it compiling).
  set(_tfcells_tf_gpu_ops ${TFCELLS_CUDA_BUILD_TF_GPU_OPS})
  if(TFCELLS_BUILD_TF_OPS AND _tfcells_tf_gpu_ops)
    python_value(_tfcells_tf_cuda_version
      "import tensorflow as tf; print(tf.sysconfig.get_build_info().get('cuda_version', ''))")
    string(REGEX MATCH "^[0-9]+" _tfcells_tf_cuda_major "${_tfcells_tf_cuda_version}")
    string(REGEX MATCH "^[0-9]+" _tfcells_nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
    if(_tfcells_tf_cuda_major AND NOT _tfcells_tf_cuda_major STREQUAL _tfcells_nvcc_major)
      message(WARNING "tfcells: TensorFlow was built with CUDA ${_tfcells_tf_cuda_version} but "
              "nvcc is CUDA ${CMAKE_CUDA_COMPILER_VERSION}: not building the TensorFlow GPU "
              "kernels (they would need a driver for CUDA ${_tfcells_nvcc_major} beside "
              "TensorFlow's CUDA ${_tfcells_tf_cuda_major}). Build with CUDA "
              "${_tfcells_tf_cuda_major}'s nvcc (-DCMAKE_CUDA_COMPILER=...) to get them.")
      set(_tfcells_tf_gpu_ops OFF)
    endif()
  endif()
  if(TFCELLS_BUILD_TF_OPS AND _tfcells_tf_gpu_ops)
    # TensorFlow's headers name CUDA's as third_party/gpus/cuda/include/...
    set(_tfcells_tf_cuda_dir "${CMAKE_CURRENT_BINARY_DIR}/tf_cuda_include")
    file(MAKE_DIRECTORY "${_tfcells_tf_cuda_dir}/third_party/gpus/cuda")
    list(GET CUDAToolkit_INCLUDE_DIRS 0 _tfcells_cuda_include)
    file(CREATE_LINK "${_tfcells_cuda_include}" "${_tfcells_tf_cuda_dir}/third_party/gpus/cuda/include"
         SYMBOLIC)

    add_library(_tfcells_gpu_ops SHARED csrc/tf/rnn_gpu_kernels.cc)
    set_target_properties(_tfcells_gpu_ops PROPERTIES PREFIX ""
      CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
    target_include_directories(_tfcells_gpu_ops BEFORE PRIVATE "${_tfcells_tf_cuda_dir}")
    target_compile_definitions(_tfcells_gpu_ops PRIVATE GOOGLE_CUDA=1)
    target_compile_options(_tfcells_gpu_ops PRIVATE ${TF_CFLAGS} -O2 -Wno-sign-compare
                           -Wno-deprecated-declarations)
    target_link_libraries(_tfcells_gpu_ops PRIVATE tfcells_cuda ${TF_LFLAGS})
    target_link_options(_tfcells_gpu_ops PRIVATE -Wl,--no-undefined)
    set_target_properties(_tfcells_gpu_ops PROPERTIES INSTALL_RPATH "${_tfcells_cublas_rpath}")
    install(TARGETS _tfcells_gpu_ops LIBRARY DESTINATION tfcells)
  endif()
endif()
