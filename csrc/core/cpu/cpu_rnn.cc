// The CPU entry points: each call runs the kernels of the ISA level chosen at load
// (cpu_isa.cc). Compiled once, for any x86-64 (no ISA flags).
#include "cpu_rnn.h"

#include <cblas.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

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
std::atomic<bool> split_units_setting{false};
std::atomic<bool> pin_shards_setting{true};
std::atomic<RowCopies> row_copies_setting{RowCopies::kAuto};

// OpenBLAS' Haswell/Zen sgemm kernel prefetches the next packed panel of B while it multiplies.
// When op(B)'s side of C is at most GEMM_P (320) wide — a gate's H columns, or all of G*H for a
// small layer — the driver packs every panel into one slot (level3.c, l1stride = 0), so those
// prefetches land 15-40 KiB past it, on pages of OpenBLAS' scratch buffer that nothing has
// written. A prefetch to an unmapped page costs a page walk each time (78 ns against 0.7 ns,
// measured in this project's VMs), which made such GEMMs 3x slower for the life of a process
// (SimpleRNN H=256 training: 203 ms fresh, 89 ms once primed). The buffers are a global pool of
// slots (lowest free slot per call, never unmapped): writing those pages once in each slot
// fixes it. A GEMM with a wide op(B) packs B contiguously and writes them, so several threads
// run one each, entering together so that each holds a different slot. ~15 ms once per process;
// callers beyond `slots` at once would only lose speed.
void PrimeOpenBlasBuffers() {
  const int slots = static_cast<int>(std::clamp(2u * std::thread::hardware_concurrency(), 4u, 32u));
  std::atomic<int> arrived{0}, started{slots};
  std::vector<std::thread> threads;
  try {
    for (int t = 0; t < slots; ++t)
      threads.emplace_back([&] {
        // C [128, 1024] = A [128, 320] B [320, 1024]: B packed contiguously, 160 KiB per slot.
        std::vector<float> a(128 * 320, 0.0f), b(320 * 1024, 0.0f), c(128 * 1024);
        arrived.fetch_add(1);
        while (arrived.load() < started.load()) std::this_thread::yield();
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 128, 1024, 320, 1.0f,
                          a.data(), 320, b.data(), 1024, 0.0f, c.data(), 1024);
      });
  } catch (const std::system_error&) {  // no more threads: prime the slots of those running
    started.store(static_cast<int>(threads.size()));
  }
  for (std::thread& t : threads) t.join();
}

}  // namespace

// OpenBLAS' own threads busy-wait for each other; on a loaded machine (or beside TensorFlow's
// pools) every GEMM then waits for descheduled threads. tfcells runs OpenBLAS single-threaded
// and parallelises large GEMMs itself, through the caller's pool.
CpuOptions CpuRunOptions(const CpuOptions& options) {
  static std::once_flag once;
  std::call_once(once, [] {
    scipy_openblas_set_num_threads(1);
    PrimeOpenBlasBuffers();
  });
  CpuOptions run = options;
  if (run.products == StepProducts::kAuto)
    run.products = CpuBf16Products() ? StepProducts::kBFloat16 : StepProducts::kFloat32;
  if (run.l2_cache_bytes <= 0) run.l2_cache_bytes = CpuL2CacheBytes();
  run.split_units = options.split_units || split_units_setting.load();
  run.pin_shards = options.pin_shards && pin_shards_setting.load();
  if (run.row_copies == RowCopies::kAuto) run.row_copies = row_copies_setting.load();
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

bool CpuBf16Products() {
  const CpuKernels& k = Kernels();
  return k.amx_tiles || (k.native_bf16_dot && !CpuIsIntel());
}

#if defined(__linux__)
static_assert(sizeof(cpu_set_t) <= ShardCpus::Pin::kMaskBytes, "Pin::old_mask_");

ShardCpus::ShardCpus() : starter_(std::this_thread::get_id()), starter_cpu_(sched_getcpu()) {
  if (!Hold(starter_cpu_)) starter_cpu_ = -1;
}

bool ShardCpus::Hold(int cpu) {
  if (cpu < 0 || cpu >= kMaxCpus) return false;
  const std::uint64_t bit = std::uint64_t(1) << (cpu % 64);
  return !(held_[cpu / 64].fetch_or(bit, std::memory_order_relaxed) & bit);
}

ShardCpus::Pin::Pin(ShardCpus& cpus, bool on) {
  cpu_set_t& old = *reinterpret_cast<cpu_set_t*>(old_mask_);
  if (!on || sched_getaffinity(0, sizeof(old), &old) != 0) return;
  int target = -1;
  if (std::this_thread::get_id() == cpus.starter_) {
    target = cpus.starter_cpu_;  // held by the constructor
  } else {
    const int here = sched_getcpu();
    if (here >= 0 && here < kMaxCpus && CPU_ISSET(here, &old) && cpus.Hold(here)) target = here;
    // Else the next free CPU after this one, so that tasks that collide spread out.
    for (int i = 1; target < 0 && here >= 0 && i < kMaxCpus; ++i) {
      const int c = (here + i) % kMaxCpus;
      if (CPU_ISSET(c, &old) && cpus.Hold(c)) target = c;
    }
  }
  if (target < 0 || !CPU_ISSET(target, &old)) return;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(target, &one);
  if (sched_setaffinity(0, sizeof(one), &one) == 0) cpu_ = target;
}

ShardCpus::Pin::~Pin() {
  if (cpu_ >= 0) sched_setaffinity(0, sizeof(cpu_set_t), reinterpret_cast<cpu_set_t*>(old_mask_));
}
#else
ShardCpus::ShardCpus() : starter_(std::this_thread::get_id()) {}
bool ShardCpus::Hold(int) { return false; }
ShardCpus::Pin::Pin(ShardCpus&, bool) {}
ShardCpus::Pin::~Pin() {}
#endif

void SetCpuGemmThreads(int threads) { gemm_threads_setting.store(std::max(0, threads)); }
int CpuGemmThreads() { return gemm_threads_setting.load(); }

void SetCpuSplitUnits(bool on) { split_units_setting.store(on); }
bool CpuSplitUnits() { return split_units_setting.load(); }
void SetCpuPinShards(bool on) { pin_shards_setting.store(on); }
bool CpuPinShards() { return pin_shards_setting.load(); }
void SetCpuRowCopies(RowCopies copies) { row_copies_setting.store(copies); }
RowCopies CpuRowCopies() { return row_copies_setting.load(); }

}  // namespace tfcells
