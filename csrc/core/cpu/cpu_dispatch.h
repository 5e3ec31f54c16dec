// Inside the CPU backend: the kernels of one ISA level, as the dispatcher calls them.
// cpu_kernels.cc is compiled once per level (cmake/cpu_levels.cmake); each compilation defines
// CpuKernelsOf_<namespace>(), and the dispatcher (cpu_rnn.cc, compiled once) calls the chosen
// level's.
#pragma once

#include <type_traits>

#include "cpu_rnn.h"

// CpuKernelsOf_isa_x86_64_v3 for TFCELLS_ISA = isa_x86_64_v3.
#define TFCELLS_LEVEL_NAME2(prefix, id) prefix##id
#define TFCELLS_LEVEL_NAME(prefix, id) TFCELLS_LEVEL_NAME2(prefix, id)

namespace tfcells {

// Same signatures as ForwardCpu/BackwardCpu; options already capped (CpuRunOptions).
struct CpuKernels {
  void (*forward_f32)(const ForwardArgs<float>&, const CpuOptions&);
  void (*forward_f64)(const ForwardArgs<double>&, const CpuOptions&);
  void (*forward_bf16)(const ForwardArgs<float, bfloat16>&, const CpuOptions&);
  void (*forward_f16)(const ForwardArgs<float, float16>&, const CpuOptions&);
  void (*backward_f32)(const BackwardArgs<float>&, const CpuOptions&);
  void (*backward_f64)(const BackwardArgs<double>&, const CpuOptions&);
  void (*backward_bf16)(const BackwardArgs<float, bfloat16>&, const CpuOptions&);
  void (*backward_f16)(const BackwardArgs<float, float16>&, const CpuOptions&);
  bool native_bf16_dot;  // the level has AVX512_BF16's dot product
  bool amx_tiles;        // the level multiplies bfloat16 pairs on AMX tiles

  // The entry for these arguments' types.
  template <typename T, typename S>
  auto Forward(const ForwardArgs<T, S>&) const {
    if constexpr (std::is_same_v<S, bfloat16>) return forward_bf16;
    else if constexpr (std::is_same_v<S, float16>) return forward_f16;
    else if constexpr (std::is_same_v<T, double>) return forward_f64;
    else return forward_f32;
  }
  template <typename T, typename S>
  auto Backward(const BackwardArgs<T, S>&) const {
    if constexpr (std::is_same_v<S, bfloat16>) return backward_bf16;
    else if constexpr (std::is_same_v<S, float16>) return backward_f16;
    else if constexpr (std::is_same_v<T, double>) return backward_f64;
    else return backward_f32;
  }
};

// Position of the chosen level in TFCELLS_CPU_LEVELS (tfcells_cpu_levels.h, generated);
// throws std::invalid_argument when TFCELLS_CPU_ISA was not a level this machine runs.
int CpuIsaIndex();

// Whether this CPU is Intel's (cpuid's vendor string): its AVX512_BF16 dot product does no more
// FLOP per cycle than two FMAs (README, 16-bit storage), so pairs pay there only on tiles.
bool CpuIsIntel();

// Bytes of one core's L2 cache (the OS's figure; 1 MiB where it gives none).
Index CpuL2CacheBytes();

// Ways of one core's L1 data cache (the OS's figure; 0 where it gives none).
int CpuL1DataWays();

// The caller's options with SetCpuGemmThreads' cap applied, StepProducts::kAuto resolved
// (CpuBf16Products), and OpenBLAS set to one thread.
CpuOptions CpuRunOptions(const CpuOptions& options);

}  // namespace tfcells
