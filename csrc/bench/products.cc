// Benchmark-only: the GEMM floor's products (ProductsCpu) on a pool of warm threads, run at the
// ISA level the ops' kernels run at. Linked into the _tfcells_core module, not the core.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "../core/cpu/cpu_dispatch.h"
#include "products.h"
#include "tfcells_cpu_levels.h"

namespace tfcells {

#define TFCELLS_DECLARE_LEVEL(id, name) const ProductsKernels& ProductsKernelsOf_##id();
TFCELLS_CPU_LEVELS(TFCELLS_DECLARE_LEVEL)
#undef TFCELLS_DECLARE_LEVEL

namespace {

// In the order of TFCELLS_CPU_LEVELS, as CpuIsaIndex counts.
const ProductsKernels& (*const kKernelsOf[])() = {
#define TFCELLS_LEVEL_KERNELS(id, name) &ProductsKernelsOf_##id,
    TFCELLS_CPU_LEVELS(TFCELLS_LEVEL_KERNELS)
#undef TFCELLS_LEVEL_KERNELS
};

// Worker threads for ProductsCpu that stay awake between calls, as the ops' pool (TF's) does.
// The floor times many short calls back to back, and a thread started per call can begin late
// enough to be timed as GEMM time (README: how the floor is measured). Workers spin for kSpin
// after a task, then park.
class WarmPool {
 public:
  static WarmPool& Get() {
    static WarmPool* pool = new WarmPool;  // never destroyed: its threads run until exit
    return *pool;
  }

  // fn(0) on the caller, fn(1..tasks-1) on the workers; returns when all have finished.
  void Run(int tasks, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> one_at_a_time(run_mu_);
    while (static_cast<int>(workers_.size()) < tasks - 1) {
      // It starts from the current generation, so the job published next is its first.
      const int index = static_cast<int>(workers_.size()) + 1;
      const std::uint64_t seen = generation_.load(std::memory_order_relaxed);
      workers_.emplace_back([this, index, seen] { Work(index, seen); });
      workers_.back().detach();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      tasks_ = tasks;
      remaining_.store(tasks - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0);
    while (remaining_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

 private:
  // Longer than the gap between the floor's back-to-back calls, short enough to leave an idle
  // core to others soon.
  static constexpr auto kSpin = std::chrono::milliseconds(2);

  void Work(int index, std::uint64_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      // The generation and its job, read together (a worker with no task in one job may
      // wake only after the next one has been published).
      const std::function<void(int)>* job;
      int tasks;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        tasks = tasks_;
      }
      if (index < tasks) {
        (*job)(index);
        remaining_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int)>* job_ = nullptr;
  int tasks_ = 0;
  std::vector<std::thread> workers_;
};

const ParallelRunner kWarmRunner = [](int tasks, const std::function<void(int)>& fn) {
  WarmPool::Get().Run(tasks, fn);
};

CpuOptions Options(int threads) {
  CpuOptions options;
  options.runner = &kWarmRunner;
  options.max_tasks = std::max(1, threads);
  return CpuRunOptions(options);
}

}  // namespace

void ProductsCpu(Index count, bool trans_a, Index m, Index k, Index n, const float* a,
                 const float* w, float* out, int threads, bool split_units, bool bf16_pairs) {
  kKernelsOf[CpuIsaIndex()]().f32(count, trans_a, m, k, n, a, w, out, Options(threads),
                                  split_units, bf16_pairs);
}
void ProductsCpu(Index count, bool trans_a, Index m, Index k, Index n, const double* a,
                 const double* w, double* out, int threads, bool split_units, bool bf16_pairs) {
  kKernelsOf[CpuIsaIndex()]().f64(count, trans_a, m, k, n, a, w, out, Options(threads),
                                  split_units, bf16_pairs);
}

}  // namespace tfcells
