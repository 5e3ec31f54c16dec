// The CPU entry points of the core: forward and backward of every cell.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "../rnn.h"

namespace tfcells {

// Runs fn(0), ..., fn(tasks - 1), possibly in parallel, and returns when all have finished.
// The TensorFlow kernels pass TensorFlow's intra-op thread pool; without one, GEMMs run on the
// calling thread.
using ParallelRunner = std::function<void(int tasks, const std::function<void(int)>& fn)>;

// The CPU runs the input projection and dx a step at a time on the packed step GEMM (README:
// measured against one T*B-row BLAS GEMM), those of up to kCpuProjectionSteps steps back to
// back: x_t·W_x ahead of the recurrence, dx_t = dG_t·W_xᵀ behind it. Each step's products then
// read W_h alone, and W_x stays in cache through 8 steps' products instead of taking turns
// with W_h at every step (CpuBackend::ProjectionSteps: only where the two outgrow half of a
// core's L2, cpu_tuning.h). Measured on the Intel Xeon (2 MiB L2; T=100, B=64, I=H=256, LSTM
// inference, alternating processes): 8 steps 0.93-0.95x the time of one step at a time, 4 steps
// 0.97x, 16 and all 100 no better than 8. Inference keeps the projections in workspace slots
// (at most 16 Mi elements: CallPlan::Make), training in its gates cache as before.
// Bindings make their call plans with both.
inline constexpr InputProjection kCpuInputProjection = InputProjection::kPerStep;
inline constexpr Index kCpuProjectionSteps = 8;

// What the per-step products of a call with bfloat16 storage multiply: float32 values, or
// bfloat16 pairs accumulated in float32 (AVX512_BF16's dot product; on the amx level AMX
// tiles' TDPBF16PS). kAuto: pairs where they are faster (CpuBf16Products), float32 elsewhere.
// The other storage types always multiply float32 (or float64).
enum class StepProducts { kAuto, kFloat32, kBFloat16 };

// Whether the packed step GEMM copies each block of A's rows before multiplying it
// (PackedOperand::Multiply). kAuto: where a block's rows would share L1 sets and L1 has fewer
// ways than a block has rows (CpuBackend::CopiesRows); kAlways and kNever: for tests and
// comparisons.
enum class RowCopies { kAuto, kAlways, kNever };

struct CpuOptions {
  const ParallelRunner* runner = nullptr;
  int max_tasks = 1;  // how many pieces a large GEMM may be split into
  StepProducts products = StepProducts::kAuto;
  Index l2_cache_bytes = 0;  // one core's (0: the machine's, CpuL2CacheBytes)
  // Whether time loops of large layers may split each step's units across the threads
  // (CpuBackend::ForShards); also on where SetCpuSplitUnits(true) was called.
  bool split_units = false;
  // Whether the tasks of a parallel time loop hold CPUs of their own while it runs (ShardCpus);
  // off also where SetCpuPinShards(false) was called.
  bool pin_shards = true;
  // Pointwise loops and column sums of fewer elements run on the calling thread (0: the tuned
  // cpu_tuning::kMinParallelElements; the self-test sets 1 to split every loop).
  Index min_parallel_elements = 0;
  RowCopies row_copies = RowCopies::kAuto;  // also SetCpuRowCopies'
};

// The CPUs the tasks of one parallel time loop hold while it runs, so that no two of them share
// one (Linux; elsewhere Pin does nothing). Each task of a time loop runs from its first step to
// its last, but Linux woke the pool's thread onto the CPU of the thread that started the loop,
// or later moved it there, and left the other CPU idle for the whole call: measured on the
// Intel Xeon VM (2 vCPUs), 15-20 % of SimpleRNN inference calls took twice as long; with Pin,
// 2-4 % (README).
class ShardCpus {
 public:
  ShardCpus();  // on the thread that starts the loop: it holds the CPU it runs on

  // For its lifetime, pins the calling thread to a CPU no other task of the loop holds: the
  // starting thread to its own, another to the one it runs on where that is free, else to the
  // next free one it may run on; its destructor restores the thread's affinity mask. Does
  // nothing when `on` is false, or where no CPU is free or the system refuses.
  class Pin {
   public:
    Pin(ShardCpus& cpus, bool on);
    ~Pin();
    Pin(const Pin&) = delete;
    Pin& operator=(const Pin&) = delete;
    int cpu() const { return cpu_; }  // the CPU pinned to, or -1
    static constexpr std::size_t kMaskBytes = 128;  // sizeof(cpu_set_t)

   private:
    alignas(8) unsigned char old_mask_[kMaskBytes];  // the thread's affinity mask before
    int cpu_ = -1;
  };

 private:
  bool Hold(int cpu);  // whether the caller took `cpu` (false: out of range or held already)

  static constexpr int kMaxCpus = 1024;  // CPU_SETSIZE
  std::atomic<std::uint64_t> held_[kMaxCpus / 64] = {};
  std::thread::id starter_;
  int starter_cpu_ = -1;
};

void ForwardCpu(const ForwardArgs<float>& args, const CpuOptions& options = {});
void ForwardCpu(const ForwardArgs<double>& args, const CpuOptions& options = {});
void ForwardCpu(const ForwardArgs<float, bfloat16>& args, const CpuOptions& options = {});
void ForwardCpu(const ForwardArgs<float, float16>& args, const CpuOptions& options = {});
void BackwardCpu(const BackwardArgs<float>& args, const CpuOptions& options = {});
void BackwardCpu(const BackwardArgs<double>& args, const CpuOptions& options = {});
void BackwardCpu(const BackwardArgs<float, bfloat16>& args, const CpuOptions& options = {});
void BackwardCpu(const BackwardArgs<float, float16>& args, const CpuOptions& options = {});

// Whether a call with bfloat16 storage multiplies bfloat16 pairs here (kAuto): on AMX tiles, and
// with AVX512_BF16's dot product on CPUs other than Intel's (measured on an Intel Xeon: the pair
// kernel 122 GFLOP/s a core against 211 for float32's; on a Zen 4, 203-229 against 107-116).
// Such calls' weight gradients multiply pairs too (CpuBackend::bf16_gemms).
bool CpuBf16Products();

// Cap on the parallel pieces of one GEMM; 0 (the default) lets the caller's pool decide.
void SetCpuGemmThreads(int threads);
int CpuGemmThreads();

// Opt-in (default off): time loops whose weights are at least twice a core's L2 split each
// step's units across the threads, which then synchronise at every step by spinning. Faster
// for a lone large layer; slower where other ops share the pool at the same time (README).
void SetCpuSplitUnits(bool on);
bool CpuSplitUnits();

// On by default: the tasks of a parallel time loop each hold a CPU of their own while it runs
// (ShardCpus). Off: the scheduler places them.
void SetCpuPinShards(bool on);
bool CpuPinShards();

// kAuto by default (CpuOptions::row_copies); another value applies to every call whose options
// leave kAuto.
void SetCpuRowCopies(RowCopies copies);
RowCopies CpuRowCopies();

// Run-time ISA dispatch (cpu_isa.cc). The CPU kernels are compiled once per ISA level
// (x86-64, x86-64-v3, x86-64-v4, avx512-bf16, amx; or one "native" level); when the library
// loads it picks the best level this CPU and OS support, or the one the environment variable
// TFCELLS_CPU_ISA names.
//
// The level the kernels run at. Throws std::invalid_argument, as every entry point above does,
// when TFCELLS_CPU_ISA names no level of this build or one this machine cannot run (the message
// lists the valid choices).
std::string CpuIsa();
// Every level of this build this machine can run, lowest first.
std::vector<std::string> CpuIsas();
// Every level of this build, lowest first.
std::vector<std::string> CpuIsasBuilt();
// Runs the kernels at `level` from now on ("" : the best); for the self-test and timings that
// compare levels in one process. Throws as CpuIsa does for an invalid level.
void SetCpuIsa(const std::string& level);

}  // namespace tfcells
