// The CPU entry points: each call runs the kernels of the ISA level chosen at load
// (cpu_isa.cc). Compiled once, for any x86-64 (no ISA flags).
#include "cpu_rnn.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <mutex>

#include "cpu_dispatch.h"
#include "tfcells_cpu_levels.h"

namespace tfcells {

#define TFCELLS_DECLARE_LEVEL(id, name) const CpuKernels& CpuKernelsOf_##id();
TFCELLS_CPU_LEVELS(TFCELLS_DECLARE_LEVEL)
#undef TFCELLS_DECLARE_LEVEL

namespace {

// In the order of TFCELLS_CPU_LEVELS, as CpuIsaIndex counts.
const CpuKernels& (*const kKernelsOf[])() = {
#define TFCELLS_LEVEL_KERNELS(id, name) &CpuKernelsOf_##id,
    TFCELLS_CPU_LEVELS(TFCELLS_LEVEL_KERNELS)
#undef TFCELLS_LEVEL_KERNELS
};

const CpuKernels& Kernels() { return kKernelsOf[CpuIsaIndex()](); }

std::atomic<int> gemm_threads_setting{0};

}  // namespace

// OpenBLAS' own threads busy-wait for each other; on a loaded machine (or beside TensorFlow's
// pools) every GEMM then waits for descheduled threads. tfcells runs OpenBLAS single-threaded
// and parallelises large GEMMs itself, through the caller's pool.
CpuOptions CpuRunOptions(const CpuOptions& options) {
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
  CpuOptions run = options;
  const int cap = gemm_threads_setting.load();
  run.max_tasks = std::max(1, cap > 0 ? std::min(cap, options.max_tasks) : options.max_tasks);
  return run;
}

// One definition per argument type (the overloads cpu_rnn.h declares).
#define TFCELLS_CPU_ENTRY_POINTS(T, S)                                              \
  void ForwardCpu(const ForwardArgs<T, S>& args, const CpuOptions& options) {       \
    Kernels().Forward(args)(args, CpuRunOptions(options));                          \
  }                                                                                 \
  void BackwardCpu(const BackwardArgs<T, S>& args, const CpuOptions& options) {     \
    Kernels().Backward(args)(args, CpuRunOptions(options));                         \
  }
TFCELLS_CPU_ENTRY_POINTS(float, float)
TFCELLS_CPU_ENTRY_POINTS(double, double)
TFCELLS_CPU_ENTRY_POINTS(float, bfloat16)
TFCELLS_CPU_ENTRY_POINTS(float, float16)
#undef TFCELLS_CPU_ENTRY_POINTS

bool CpuBf16Products() { return Kernels().native_bf16_dot; }

void SetCpuGemmThreads(int threads) { gemm_threads_setting.store(std::max(0, threads)); }
int CpuGemmThreads() { return gemm_threads_setting.load(); }

}  // namespace tfcells
