// A time loop split by units across the pool's tasks (CpuBackend::ForShards): at every step,
// part p of P computes its own columns, and no part reads the others' results of step s - 1
// before all of them have finished it. The tasks synchronise through atomics, spinning: a step
// takes a fraction of a millisecond, and sleeping and waking would cost more than that.
//
// A pool may start a task late, or run the tasks one after another on fewer threads. So a task
// that waits for a part nobody has claimed takes it over after kTakeOver, and from then on at
// once: the loop never deadlocks, and with one thread runs every part in turn. A task that finds
// its own part taken over joins at the next unclaimed step. Each (part, step) runs exactly once,
// in step order per part, by whichever task claims it, with the same results.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../common.h"

namespace tfcells {
TFCELLS_ISA_BEGIN

// Spins until ready(), calling late() at each check after kTakeOver (StepParts takes a late
// part over there) and yielding the thread after kYield (an oversubscribed machine).
template <typename Ready, typename Late>
void SpinUntil(const Ready& ready, const Late& late) {
  using Clock = std::chrono::steady_clock;
  constexpr auto kTakeOver = std::chrono::microseconds(200);
  constexpr auto kYield = std::chrono::milliseconds(2);
  Clock::time_point start{};
  for (unsigned i = 0; !ready(); ++i) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
    if (i % 64 != 63) continue;
    const Clock::time_point now = Clock::now();
    if (i == 63) start = now;
    if (now - start >= kTakeOver) late();
    if (now - start >= kYield) std::this_thread::yield();
  }
}

class StepParts {
 public:
  StepParts(int parts, Index steps) : parts_(new Part[parts]), count_(parts), steps_(steps) {}

  // Runs the loop as task `own` (one call per task, any number of them at once): body(part, s,
  // wait) computes part `part` of step s and calls wait() before it reads another part's
  // results of step s - 1 (what it does before overlaps the other parts' step s - 1).
  template <typename Body>
  void Run(int own, const Body& body) {
    Part& mine = parts_[own];
    for (Index s = 0; s < steps_;) {
      Index expected = s;
      if (!mine.claimed.compare_exchange_strong(expected, s + 1, std::memory_order_acq_rel)) {
        s = expected;  // taken over up to here
        continue;
      }
      mine.abandoned.store(false, std::memory_order_relaxed);
      // The run before on this part may be another task's, still finishing.
      SpinUntil([&] { return mine.done.load(std::memory_order_acquire) >= s; }, [] {});
      RunPart(own, s, body);
      ++s;
    }
  }

 private:
  // Steps of one part claimed and finished, and whether a waiting task took it over; each part
  // on its own cache line.
  struct alignas(64) Part {
    std::atomic<Index> claimed{0}, done{0};
    std::atomic<bool> abandoned{false};
  };

  template <typename Body>
  void RunPart(int p, Index s, const Body& body) {
    body(p, s, [&] {
      for (int q = 0; q < count_; ++q)
        if (q != p && s > 0) AwaitOrTakeOver(q, s - 1, body);
    });
    parts_[p].done.store(s + 1, std::memory_order_release);
  }

  // Waits until part q has finished step s, taking the step over if it is still unclaimed after
  // kTakeOver (at once once q was taken over before). Step s of every other part is finished
  // by then (the caller's step s + 1 waited for them), so the step runs without waiting.
  template <typename Body>
  void AwaitOrTakeOver(int q, Index s, const Body& body) {
    Part& part = parts_[q];
    auto take_over = [&] {
      Index expected = s;
      if (part.claimed.load(std::memory_order_relaxed) != s ||
          !part.claimed.compare_exchange_strong(expected, s + 1, std::memory_order_acq_rel))
        return;
      part.abandoned.store(true, std::memory_order_relaxed);
      RunPart(q, s, body);
    };
    if (part.abandoned.load(std::memory_order_relaxed)) take_over();
    SpinUntil([&] { return part.done.load(std::memory_order_acquire) > s; }, take_over);
  }

  std::unique_ptr<Part[]> parts_;
  int count_;
  Index steps_;
};

// Batch shards, each a time loop over its own rows, one per task. A shard's steps run in order,
// each exactly once, by its own task or, until that task starts, by another: a task runs one
// step of a shard whose task has not started after each step of its own. Shards do not read each
// other's results, so this changes no result; a pool thread that starts late (measured on the
// Intel Xeon VM: 0.5-4 ms late in the first calls after an idle pause) then costs half its delay,
// as both shards advance meanwhile, each at half speed. It was late mostly because it had been
// woken onto the very CPU the starting task holds (pinned there, ShardCpus), where it could run
// only once the scheduler preempted that task. So a task yields its CPU before a step it runs
// for another shard, and the late thread starts, pins itself to a free CPU and takes its own
// steps (there, SimpleRNN inference in the five calls after a 0.12 s pause, traced with a yield
// before every helped step: a median of 6.46 against 7.31 ms, the late start at most 0.95 ms in
// 40 calls against 4.1; with the bound below, 0.87x the time in benchmark-style blocks). Only
// the first kHelpYields times in a loop: a thread still late after that is not waiting behind
// this one, and more yields would only hand the CPU to other processes.
class ShardSteps {
 public:
  ShardSteps(int shards, Index steps) : shards_(new Shard[shards]), count_(shards),
                                        steps_(steps) {}

  // Runs shard `own`'s steps as its task (one call per task): body(shard, s) runs step s of a
  // shard.
  template <typename Body>
  void Run(int own, const Body& body) {
    Shard& mine = shards_[own];
    mine.started.store(true, std::memory_order_relaxed);
    int yields = kHelpYields;
    for (Index s = mine.claimed.load(std::memory_order_acquire); s < steps_;
         s = mine.claimed.load(std::memory_order_acquire)) {
      if (!mine.claimed.compare_exchange_strong(s, s + 1, std::memory_order_acq_rel))
        continue;  // another task ran step s meanwhile
      // The other task's step s - 1 may still be running.
      SpinUntil([&] { return mine.done.load(std::memory_order_acquire) >= s; }, [] {});
      body(own, s);
      mine.done.store(s + 1, std::memory_order_release);
      for (int q = 0; q < count_; ++q)
        if (q != own && HelpOnce(q, body, yields)) break;
    }
    // Shards whose task has still not started: every step that is left.
    for (int q = 0; q < count_; ++q)
      while (HelpOnce(q, body, yields)) {
      }
  }

 private:
  struct alignas(64) Shard {
    std::atomic<Index> claimed{0}, done{0};  // steps claimed and finished
    std::atomic<bool> started{false};        // its own task has begun
  };

  static constexpr int kHelpYields = 16;

  // Runs the next step of shard q if its task has not started and no step of it is running,
  // first yielding the CPU while `yields` lasts (its thread may be waiting for this CPU).
  template <typename Body>
  bool HelpOnce(int q, const Body& body, int& yields) {
    Shard& shard = shards_[q];
    if (shard.started.load(std::memory_order_relaxed) ||
        shard.done.load(std::memory_order_acquire) >= steps_)
      return false;
    if (yields > 0) {
      --yields;
      std::this_thread::yield();
      if (shard.started.load(std::memory_order_relaxed)) return false;
    }
    Index s = shard.done.load(std::memory_order_acquire);
    if (s >= steps_ || !shard.claimed.compare_exchange_strong(s, s + 1, std::memory_order_acq_rel))
      return false;
    body(q, s);
    shard.done.store(s + 1, std::memory_order_release);
    return true;
  }

  std::unique_ptr<Shard[]> shards_;
  int count_;
  Index steps_;
};

TFCELLS_ISA_END
}  // namespace tfcells
