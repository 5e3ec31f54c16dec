#include "cublas_loader.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace tfcells {
namespace cublas {
namespace {

constexpr const char* kSonames[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11"};

std::string LoadedPath(void* lib, const std::string& fallback) {
  link_map* map = nullptr;
  if (dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && map->l_name[0])
    return map->l_name;
  return fallback;
}

template <typename F>
bool Bind(void* lib, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (*out == nullptr) {
    *missing += std::string(missing->empty() ? "" : ", ") + name;
    return false;
  }
  return true;
}

// Fills *api from `lib`; returns an error message or "".
std::string BindAll(void* lib, Api* api) {
  std::string missing;
  Bind(lib, "cublasCreate_v2", &api->create, &missing);
  Bind(lib, "cublasDestroy_v2", &api->destroy, &missing);
  Bind(lib, "cublasGetVersion_v2", &api->get_version, &missing);
  Bind(lib, "cublasSetStream_v2", &api->set_stream, &missing);
  Bind(lib, "cublasSetMathMode", &api->set_math_mode, &missing);
  Bind(lib, "cublasSetWorkspace_v2", &api->set_workspace, &missing);
  Bind(lib, "cublasSgemm_v2", &api->sgemm, &missing);
  Bind(lib, "cublasDgemm_v2", &api->dgemm, &missing);
  Bind(lib, "cublasGemmEx", &api->gemm_ex, &missing);
  api->status_string =
      reinterpret_cast<const char* (*)(Status)>(dlsym(lib, "cublasGetStatusString"));
  return missing.empty() ? "" : "it lacks " + missing;
}

struct Loaded {
  Api api;
  std::string error;  // set when no cuBLAS could be loaded
};

Loaded LoadOnce() {
  Loaded out;
  std::string tried;
  auto try_open = [&](const std::string& name, int flags) -> bool {
    void* lib = dlopen(name.c_str(), flags);
    if (lib == nullptr) {
      if (!(flags & RTLD_NOLOAD)) {
        const char* why = dlerror();
        tried += "\n  " + name + ": " + (why ? why : "not found");
      }
      return false;
    }
    const std::string error = BindAll(lib, &out.api);
    if (!error.empty()) {
      tried += "\n  " + name + ": " + error;
      return false;
    }
    out.api.library = LoadedPath(lib, name);
    return true;
  };
  // 1. An explicit choice.
  if (const char* path = std::getenv("TFCELLS_CUBLAS_LIBRARY"); path && path[0]) {
    if (try_open(path, RTLD_NOW | RTLD_LOCAL)) return out;
  }
  // 2. The cuBLAS this process already has (TensorFlow's, PyTorch's, CuPy's).
  for (const char* soname : kSonames)
    if (try_open(soname, RTLD_NOW | RTLD_NOLOAD)) return out;
  // 3. The library search path.
  for (const char* soname : kSonames)
    if (try_open(soname, RTLD_NOW | RTLD_LOCAL)) return out;
  out.error =
      "tfcells' CUDA kernels need cuBLAS (libcublas.so.13, .12 or .11) and could not load "
      "one. Install it (e.g. the nvidia-cublas wheel, or the CUDA toolkit's libcublas), put "
      "its directory on LD_LIBRARY_PATH, set TFCELLS_CUBLAS_LIBRARY to the file, or import "
      "the framework that brings one (PyTorch, CuPy) first. Tried:" +
      tried;
  return out;
}

// Set once the process has begun to exit: handles of threads that end after that are left to
// the process' end, since the CUDA driver may already be gone.
std::atomic<bool> exiting{false};

struct HandleEntry {
  int device;
  cudaStream_t stream;
  Handle handle;
};

// Never destroyed before the thread ends: cublasDestroy synchronises the device, which an op
// must not do. A thread holds one handle per (device, stream) it has used; a stream's address
// reused after it was destroyed simply reuses the handle (nothing of it stays queued).
struct ThreadHandles {
  const Api* api = nullptr;
  std::vector<HandleEntry> handles;
  ~ThreadHandles() {
    if (api == nullptr || exiting.load()) return;
    for (const HandleEntry& h : handles) api->destroy(h.handle);
  }
};

}  // namespace

const Api* Load(std::string* error) {
  static const Loaded loaded = LoadOnce();  // thread-safe initialisation
  if (!loaded.error.empty()) {
    *error = loaded.error;
    return nullptr;
  }
  return &loaded.api;
}

Handle ThreadHandle(const Api& api, int device, cudaStream_t stream, std::string* error) {
  static std::once_flag at_exit;
  std::call_once(at_exit, [] { std::atexit([] { exiting.store(true); }); });
  thread_local ThreadHandles handles;
  handles.api = &api;
  for (const HandleEntry& h : handles.handles)
    if (h.device == device && h.stream == stream) return h.handle;
  Handle handle = nullptr;
  const Status status = api.create(&handle);
  if (status != kSuccess) {
    *error = "cublasCreate failed on device " + std::to_string(device) + ": " +
             StatusString(api, status);
    return nullptr;
  }
  handles.handles.push_back({device, stream, handle});
  return handle;
}

std::string StatusString(const Api& api, Status status) {
  if (api.status_string != nullptr) {
    if (const char* s = api.status_string(status)) return s;
  }
  return "cuBLAS status " + std::to_string(status);
}

}  // namespace cublas
}  // namespace tfcells
