// Whole-call CUDA graphs: see cuda_graphs.h.
#include "cuda_graphs.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../core/plan.h"
#include "constants.h"

namespace tfcells {
namespace cuda_graphs {
namespace {

using cuda_constants::kMaxGraphs;
using cuda_constants::kMaxGraphsPerShape;

std::string ErrorText(const char* what, cudaError_t e) {
  return std::string(what) + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

bool GraphsOn() {
  const char* v = std::getenv("TFCELLS_CUDA_GRAPHS");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

struct Entry {
  std::string shape, buffers;
  cudaGraphExec_t exec = nullptr;
  std::int64_t work[kNumCounters] = {};  // what the capture counted (plan.h's counters)
  std::uint64_t last_use = 0;
};

// Process-wide, never destroyed (executable graphs must not be destroyed after the CUDA runtime
// has shut down at exit).
struct Cache {
  std::mutex mu;
  std::vector<Entry> entries;
  std::unordered_set<std::string> uncapturable;  // shapes whose capture failed
  std::uint64_t clock = 0;
  Stats stats;
};

Cache& TheCache() {
  static Cache* cache = new Cache;
  return *cache;
}

std::atomic<bool> exiting{false};  // set at process exit, when the CUDA runtime may be gone

// This thread's capture stream on `device` (the current device), created once and destroyed
// when the thread ends (a captured graph does not depend on the stream it was captured on).
cudaStream_t CaptureStream(int device, std::string* error) {
  struct Streams {
    std::vector<std::pair<int, cudaStream_t>> by_device;
    ~Streams() {
      if (exiting.load()) return;
      for (const auto& [d, s] : by_device) cudaStreamDestroy(s);
    }
  };
  static std::once_flag at_exit;
  std::call_once(at_exit, [] { std::atexit([] { exiting.store(true); }); });
  thread_local Streams streams;
  for (const auto& [d, s] : streams.by_device)
    if (d == device) return s;
  cudaStream_t s = nullptr;
  const cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = ErrorText("cudaStreamCreateWithFlags", e);
    return nullptr;
  }
  streams.by_device.emplace_back(device, s);
  return s;
}

// Adds sign * counts to plan.h's counters: a replay counts what its capture recorded, a failed
// capture takes its counts back.
void AddCounts(const std::int64_t (&counts)[kNumCounters], int sign) {
  for (int c = 0; c < kNumCounters; ++c)
    if (counts[c] != 0) AddWork(static_cast<Counter>(c), sign * counts[c]);
}

// Launches entry's graph on `stream` and counts its work (caller holds the lock).
std::string Launch(const Entry& entry, cudaStream_t stream) {
  const cudaError_t e = cudaGraphLaunch(entry.exec, stream);
  if (e != cudaSuccess) return ErrorText("cudaGraphLaunch", e);
  AddCounts(entry.work, 1);
  return "";
}

std::string Direct(Call& call, cudaStream_t stream) {
  std::string error = call.Prepare(stream);
  return error.empty() ? call.Enqueue() : error;
}

// Captures `call` on this thread's capture stream. Returns the graph, or null (with *error
// saying why) when the capture or a launch in it failed.
cudaGraph_t Capture(Call& call, int device, std::string* error) {
  const cudaStream_t s = CaptureStream(device, error);
  if (s == nullptr) return nullptr;
  *error = call.Prepare(s);
  if (!error->empty()) return nullptr;
  cudaError_t e = cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = ErrorText("cudaStreamBeginCapture", e);
    return nullptr;
  }
  *error = call.Enqueue();
  cudaGraph_t graph = nullptr;
  e = cudaStreamEndCapture(s, &graph);
  if (error->empty() && e == cudaSuccess && graph != nullptr) return graph;
  if (error->empty()) *error = ErrorText("cudaStreamEndCapture", e);
  if (graph != nullptr) cudaGraphDestroy(graph);
  cudaGetLastError();  // not sticky: clear it, so the direct run's checks start clean
  return nullptr;
}

// Makes `graph` the executable graph of key (caller holds the lock): updates the least recently
// used one of its shape when that shape holds kMaxGraphsPerShape, else instantiates a new one
// (first destroying the least recently used of all when kMaxGraphs are held). Null: failed.
Entry* Install(Cache& cache, GraphKey& key, cudaGraph_t graph, std::string* error) {
  Entry* oldest_of_shape = nullptr;
  Entry* oldest = nullptr;
  int of_shape = 0;
  for (Entry& e : cache.entries) {
    if (oldest == nullptr || e.last_use < oldest->last_use) oldest = &e;
    if (e.shape != key.shape) continue;
    ++of_shape;
    if (oldest_of_shape == nullptr || e.last_use < oldest_of_shape->last_use)
      oldest_of_shape = &e;
  }
  if (of_shape >= kMaxGraphsPerShape) {
    cudaGraphExecUpdateResultInfo info;
    if (cudaGraphExecUpdate(oldest_of_shape->exec, graph, &info) == cudaSuccess) {
      oldest_of_shape->buffers = std::move(key.buffers);
      ++cache.stats.updates;
      return oldest_of_shape;
    }
    cudaGetLastError();
    oldest = oldest_of_shape;  // replace it below
  }
  if (of_shape >= kMaxGraphsPerShape || static_cast<int>(cache.entries.size()) >= kMaxGraphs) {
    cudaGraphExecDestroy(oldest->exec);  // a launch in flight completes first
    if (oldest != &cache.entries.back()) *oldest = std::move(cache.entries.back());
    cache.entries.pop_back();
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = ErrorText("cudaGraphInstantiate", e);
    return nullptr;
  }
  ++cache.stats.instantiations;
  cache.entries.push_back({std::move(key.shape), std::move(key.buffers), exec, {}, 0});
  return &cache.entries.back();
}

// Whether the call should go straight onto `stream`: graphs are off, or the caller is itself
// capturing `stream` (its capture then records the launches).
bool LaunchDirectly(cudaStream_t stream, int* device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const bool direct = !GraphsOn() || cudaGetDevice(device) != cudaSuccess ||
                      cudaStreamIsCapturing(stream, &status) != cudaSuccess ||
                      status != cudaStreamCaptureStatusNone;
  cudaGetLastError();
  return direct;
}

}  // namespace

std::string Run(GraphKey key, bool capturable, cudaStream_t stream, Call& call) {
  Cache& cache = TheCache();
  int device = 0;
  bool direct = !capturable || LaunchDirectly(stream, &device);
  key.Shape(device);
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    direct = direct || cache.uncapturable.count(key.shape) > 0;
    if (direct) {
      ++cache.stats.direct;
    } else {
      for (Entry& e : cache.entries) {
        if (e.shape != key.shape || e.buffers != key.buffers) continue;
        e.last_use = ++cache.clock;
        ++cache.stats.replays;
        return Launch(e, stream);
      }
    }
  }
  if (direct) return Direct(call, stream);

  WorkRecorder recorder;
  std::string why;
  cudaGraph_t graph = Capture(call, device, &why);
  std::unique_lock<std::mutex> lock(cache.mu);
  Entry* entry = nullptr;
  if (graph != nullptr) {
    entry = Install(cache, key, graph, &why);
    cudaGraphDestroy(graph);
  }
  if (entry == nullptr) {  // no graph to launch: its counts go back, and the call runs directly
    AddCounts(recorder.counts, -1);
    lock.unlock();
    const std::string error = Direct(call, stream);
    if (error.empty()) {  // it was the capture that failed, not the call: stop capturing it
      lock.lock();
      ++cache.stats.failed_captures;
      cache.stats.last_failure = why;
      cache.uncapturable.insert(key.shape);
    }
    return error;
  }
  std::memcpy(entry->work, recorder.counts, sizeof(entry->work));
  entry->last_use = ++cache.clock;
  // The capture counted its work already: launch without counting it a second time.
  const cudaError_t e = cudaGraphLaunch(entry->exec, stream);
  return e == cudaSuccess ? "" : ErrorText("cudaGraphLaunch", e);
}

Stats GetStats() {
  Cache& cache = TheCache();
  std::lock_guard<std::mutex> lock(cache.mu);
  Stats s = cache.stats;
  s.cached = static_cast<std::int64_t>(cache.entries.size());
  return s;
}

}  // namespace cuda_graphs
}  // namespace tfcells
