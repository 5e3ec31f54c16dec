#include "cpu_rnn.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu_backend.h"

namespace tfcells {

namespace {

std::atomic<int> gemm_threads_setting{0};

CBLAS_TRANSPOSE Op(bool trans) { return trans ? CblasTrans : CblasNoTrans; }

void Blas(bool ta, bool tb, Index m, Index n, Index k, const float* a, Index lda,
          const float* b, Index ldb, float beta, float* c, Index ldc) {
  scipy_cblas_sgemm(CblasRowMajor, Op(ta), Op(tb), m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}
void Blas(bool ta, bool tb, Index m, Index n, Index k, const double* a, Index lda,
          const double* b, Index ldb, double beta, double* c, Index ldc) {
  scipy_cblas_dgemm(CblasRowMajor, Op(ta), Op(tb), m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
void SplitGemm(const CpuBackend& be, bool ta, bool tb, Index m, Index n, Index k, const T* a,
               Index lda, const T* b, Index ldb, T beta, T* c, Index ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS rejects k == 0 (its leading dimensions would be 0): C = beta * C
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  int tasks = be.runner ? be.max_tasks : 1;
  if (2.0 * m * n * k < cpu_tuning::kMinParallelGemmFlops) tasks = 1;
  // Split the larger side of C into contiguous blocks, one per task.
  const bool by_rows = m >= n;
  const Index extent = by_rows ? m : n, align = by_rows ? cpu_tuning::kSplitRowAlign : cpu_tuning::kSplitColAlign;
  const Index block = ((extent + tasks - 1) / tasks + align - 1) / align * align;
  tasks = static_cast<int>(std::min<Index>(tasks, (extent + block - 1) / block));
  if (tasks <= 1) {
    Blas(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  (*be.runner)(tasks, [&](int task) {
    const Index begin = task * block, size = std::min(block, extent - begin);
    if (by_rows)  // rows of C are rows of op(A)
      Blas(ta, tb, size, n, k, ta ? a + begin : a + begin * lda, lda, b, ldb, beta,
           c + begin * ldc, ldc);
    else  // columns of C are columns of op(B)
      Blas(ta, tb, m, size, k, a, lda, tb ? b + begin * ldb : b + begin, ldb, beta, c + begin,
           ldc);
  });
}

// OpenBLAS' own threads busy-wait for each other; on a loaded machine (or beside TensorFlow's
// pools) every GEMM then waits for descheduled threads. tfcells runs OpenBLAS single-threaded
// and parallelises large GEMMs itself, through the caller's pool.
CpuBackend MakeBackend(const CpuOptions& options) {
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
  CpuBackend be;
  be.runner = options.runner;
  const int cap = gemm_threads_setting.load();
  be.max_tasks = std::max(1, cap > 0 ? std::min(cap, options.max_tasks) : options.max_tasks);
  return be;
}

// Worker threads for ProductsCpu that stay awake between calls, as the ops' pool (TF's) does.
// The floor times many short calls back to back; a thread started per call on an idle core of
// this virtual machine began ~1 ms late, which the floor timed as GEMM time (a 2 ms product
// ran no faster on 2 threads than on 1). Workers spin for kSpin after a task, then park.
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

// Through the same backend, sharding and split rules as the ops, on WarmPool's threads.
template <typename T>
void Products(Index count, bool trans_a, Index m, Index k, Index n, const T* a, const T* w,
              T* out, int threads) {
  const ParallelRunner runner = [](int tasks, const std::function<void(int)>& fn) {
    WarmPool::Get().Run(tasks, fn);
  };
  CpuBackend be = MakeBackend({&runner, std::max(1, threads)});
  if (count == 1) return be.Gemm(trans_a, false, m, n, k, a, trans_a ? m : k, w, n, T(0), out, n);
  const auto operand = be.StepOperand(false, k, n, w, n);
  be.ForRowShards(m, 2.0 * m * k * n, [&](CpuBackend& shard, Index b0, Index b1) {
    for (Index t = 0; t < count; ++t)
      shard.StepGemm(b1 - b0, a + (t * m + b0) * k, k, operand, T(0), out + b0 * n, n);
  });
}

}  // namespace

void ProductsCpu(Index count, bool trans_a, Index m, Index k, Index n, const float* a,
                 const float* w, float* out, int threads) {
  Products(count, trans_a, m, k, n, a, w, out, threads);
}
void ProductsCpu(Index count, bool trans_a, Index m, Index k, Index n, const double* a,
                 const double* w, double* out, int threads) {
  Products(count, trans_a, m, k, n, a, w, out, threads);
}

void CpuBackend::Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a,
                      Index lda, const float* b, Index ldb, float beta, float* c, Index ldc) {
  SplitGemm(*this, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

void CpuBackend::Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const double* a,
                      Index lda, const double* b, Index ldb, double beta, double* c,
                      Index ldc) {
  SplitGemm(*this, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

void ForwardCpu(const ForwardArgs<float>& args, const CpuOptions& options) {
  CpuBackend be = MakeBackend(options);
  Forward(be, args);
}
void ForwardCpu(const ForwardArgs<double>& args, const CpuOptions& options) {
  CpuBackend be = MakeBackend(options);
  Forward(be, args);
}
void BackwardCpu(const BackwardArgs<float>& args, const CpuOptions& options) {
  CpuBackend be = MakeBackend(options);
  Backward(be, args);
}
void BackwardCpu(const BackwardArgs<double>& args, const CpuOptions& options) {
  CpuBackend be = MakeBackend(options);
  Backward(be, args);
}

void SetCpuGemmThreads(int threads) { gemm_threads_setting.store(std::max(0, threads)); }
int CpuGemmThreads() { return gemm_threads_setting.load(); }

}  // namespace tfcells
