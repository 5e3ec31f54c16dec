// pybind11 module over the CUDA path of the core, without TensorFlow: device memory passed in
// from outside through __cuda_array_interface__ (CuPy arrays, PyTorch CUDA tensors, Numba
// device arrays). Used by tests/test_cuda.py and tools/gpu_check.py on GPU machines.
//
// The caller allocates everything, outputs and workspace included (forward_sizes() and
// backward_workspace_size() say how much); the functions check every array, enqueue the work
// on `stream` (a cudaStream_t as an int, 0 for the legacy default stream) and return without
// synchronising. 16-bit calls: float16 x, or storage="bfloat16" with the bits in 2-byte
// integers; their weights, masks, cache and workspace are float32. An optional blas_workspace
// (blas_workspace_allocation_bytes() of device memory) becomes cuBLAS' workspace, as the
// TensorFlow GPU op's allocator provides it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../core/storage.h"
#include "../cuda/cuda_rnn.h"
#include "cells.h"

namespace py = pybind11;

namespace tfcells {
namespace {

std::string CudaErrorString(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// One array described by __cuda_array_interface__ (versions 0 to 3).
struct DeviceArray {
  std::string name;
  std::uintptr_t ptr = 0;
  std::vector<Index> shape;
  char kind = 0;  // 'f', 'b', or for bfloat16 bits 'i', 'u' or 'V'
  int itemsize = 0;
  bool readonly = false;
  std::optional<std::intptr_t> stream;  // the producer's stream (version 3), if given
  int device = -1;

  Index size() const {
    Index n = 1;
    for (Index s : shape) n *= s;
    return n;
  }
  template <typename T>
  T* data() const {
    return size() ? reinterpret_cast<T*>(ptr) : nullptr;
  }
};

DeviceArray Parse(const py::handle& obj, const std::string& name) {
  DeviceArray a;
  a.name = name;
  if (!py::hasattr(obj, "__cuda_array_interface__"))
    throw py::type_error(
        name + " must be an array in GPU memory exposing __cuda_array_interface__ (a CuPy "
               "array, a PyTorch CUDA tensor, a Numba device array), got a " +
        std::string(py::str(py::type::handle_of(obj).attr("__name__"))) +
        " (a host array or CPU tensor has no such interface: move it to the GPU first)");
  const py::dict cai = obj.attr("__cuda_array_interface__");
  const auto need = [&](const char* key) -> py::object {
    if (!cai.contains(key))
      throw py::value_error(name + ": __cuda_array_interface__ has no '" + key + "'");
    return cai[key];
  };
  for (py::handle s : py::tuple(need("shape"))) a.shape.push_back(s.cast<Index>());
  for (Index s : a.shape)
    if (s < 0) throw py::value_error(name + ": negative extent in shape " + ShapeString(a.shape));
  const std::string typestr = py::str(need("typestr"));
  if (typestr.size() < 3 || (typestr[0] != '<' && typestr[0] != '|' && typestr[0] != '='))
    throw py::value_error(name + ": unsupported typestr '" + typestr +
                          "' (little-endian float32, float64, float16, bfloat16 bits or bool "
                          "expected)");
  a.kind = typestr[1];
  a.itemsize = std::stoi(typestr.substr(2));
  const py::tuple data = need("data");
  a.ptr = data[0].cast<std::uintptr_t>();
  a.readonly = data[1].cast<bool>();
  if (cai.contains("mask") && !cai["mask"].is_none())
    throw py::value_error(name + ": masked arrays are not supported");
  if (cai.contains("stream") && !cai["stream"].is_none())
    a.stream = cai["stream"].cast<std::intptr_t>();

  // C-contiguous: strides absent, or equal to the packed row-major strides (an extent-1 axis
  // may carry any stride).
  if (cai.contains("strides") && !cai["strides"].is_none() && a.size() > 0) {
    std::vector<Index> strides;
    for (py::handle s : py::tuple(cai["strides"])) strides.push_back(s.cast<Index>());
    if (strides.size() != a.shape.size())
      throw py::value_error(name + ": strides and shape differ in length");
    Index expected = a.itemsize;
    for (size_t i = a.shape.size(); i-- > 0;) {
      if (a.shape[i] != 1 && strides[i] != expected)
        throw py::value_error(name + " must be C-contiguous (row-major, packed); got shape " +
                              ShapeString(a.shape) + " with byte strides " +
                              ShapeString(strides) + ": make a contiguous copy first");
      expected *= a.shape[i];
    }
  }
  if (a.size() > 0) {
    if (a.ptr == 0) throw py::value_error(name + ": null data pointer");
    if (a.ptr % a.itemsize != 0)
      throw py::value_error(name + ": data pointer is not aligned to its element size (" +
                            std::to_string(a.itemsize) + " bytes)");
  }
  return a;
}

// The dtypes of a call's arrays. bfloat16 has no __cuda_array_interface__ typestr of its own
// (PyTorch refuses to export it): its arrays come as 2-byte integers (or void) holding the
// bits, e.g. `tensor.view(torch.int16)`, with storage="bfloat16".
enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16, kBool };

bool Matches(Dtype want, const DeviceArray& a) {
  switch (want) {
    case Dtype::kFloat32: return a.kind == 'f' && a.itemsize == 4;
    case Dtype::kFloat64: return a.kind == 'f' && a.itemsize == 8;
    case Dtype::kFloat16: return a.kind == 'f' && a.itemsize == 2;
    case Dtype::kBFloat16:
      return (a.kind == 'i' || a.kind == 'u' || a.kind == 'V') && a.itemsize == 2;
    case Dtype::kBool: return a.kind == 'b' && a.itemsize == 1;
  }
  return false;
}

const char* DtypeName(Dtype d) {
  switch (d) {
    case Dtype::kFloat32: return "float32";
    case Dtype::kFloat64: return "float64";
    case Dtype::kFloat16: return "float16";
    case Dtype::kBFloat16: return "bfloat16 (as 2-byte integers)";
    case Dtype::kBool: return "bool";
  }
  return "?";
}

std::string TypeName(const DeviceArray& a) {
  const std::string bits = std::to_string(8 * a.itemsize);
  switch (a.kind) {
    case 'b': return a.itemsize == 1 ? "bool" : "bool" + bits;
    case 'f': return "float" + bits;
    case 'i': return "int" + bits;
    case 'u': return "uint" + bits;
    default: return std::string("'") + a.kind + "' of " + std::to_string(a.itemsize) + " bytes";
  }
}

// Collects the arrays of one call, checks them and finds their common device.
// `storage`: x, the states, the outputs and their gradients; `compute`: the weights, the
// dropout masks, the cache, the workspace and the weight gradients (the same but for 16-bit
// storage, whose compute type is float32).
class Arrays {
 public:
  Arrays(Dtype storage, Dtype compute) : storage_(storage), compute_(compute) {}

  // A required or optional array of the storage type; `writable` for outputs.
  std::optional<DeviceArray> Storage(const py::object& obj, const std::string& name,
                                     bool required, bool writable = false) {
    return Typed(obj, name, required, writable, storage_, "like x");
  }
  // ... of the compute type.
  std::optional<DeviceArray> Float(const py::object& obj, const std::string& name,
                                   bool required, bool writable = false) {
    return Typed(obj, name, required, writable, compute_,
                 storage_ == compute_ ? "like x" : "(the compute type of a 16-bit call)");
  }

  std::optional<DeviceArray> Mask(const py::object& obj) {
    return Typed(obj, "mask", false, false, Dtype::kBool, "");
  }

  // Optional device memory of any dtype, used as raw bytes (cuBLAS' workspace).
  std::optional<DeviceArray> Bytes(const py::object& obj, const std::string& name) {
    if (obj.is_none()) return std::nullopt;
    return Add(Parse(obj, name), true);
  }

  // Checks that every non-empty array is device (or managed) memory of one device, and that
  // the stream belongs to it. Returns that device (-1 when every array is empty).
  int Device(std::intptr_t stream) {
    int device = -1;
    std::string first;
    for (DeviceArray& a : all_) {
      if (a.size() == 0) continue;
      cudaPointerAttributes attr{};
      const cudaError_t e = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(a.ptr));
      if (e != cudaSuccess) {
        cudaGetLastError();  // clear it
        throw std::runtime_error(a.name + ": cannot query its memory (" + CudaErrorString(e) +
                                 "); is a CUDA device present?");
      }
      if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        throw py::value_error(a.name + " is not in GPU memory (it is " +
                              (attr.type == cudaMemoryTypeHost ? "pinned host memory"
                                                               : "host memory") +
                              "): pass a device array");
      a.device = attr.device;
      if (device < 0) {
        device = attr.device;
        first = a.name;
      } else if (attr.device != device) {
        throw py::value_error(a.name + " is on GPU " + std::to_string(attr.device) + " but " +
                              first + " is on GPU " + std::to_string(device) +
                              ": put every array on one device");
      }
    }
    const auto is = [&](cudaStream_t named) { return stream == reinterpret_cast<std::intptr_t>(named); };
    if (device >= 0 && stream != 0 && !is(cudaStreamLegacy) && !is(cudaStreamPerThread)) {
      int stream_device = -1;
      const cudaError_t e =
          cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &stream_device);
      if (e != cudaSuccess) {
        cudaGetLastError();
        throw py::value_error("stream " + std::to_string(stream) +
                              " is not a valid CUDA stream: " + CudaErrorString(e));
      }
      if (stream_device != device)
        throw py::value_error("stream belongs to GPU " + std::to_string(stream_device) +
                              " but the arrays are on GPU " + std::to_string(device));
    }
    return device;
  }

  // Makes `stream` wait for the work each producer stream had queued when the arrays were
  // handed over (__cuda_array_interface__ version 3), without blocking the host.
  void WaitForProducers(cudaStream_t stream) {
    std::vector<std::intptr_t> done;
    for (const DeviceArray& a : all_) {
      if (!a.stream || *a.stream == reinterpret_cast<std::intptr_t>(stream)) continue;
      bool seen = false;
      for (auto s : done) seen = seen || s == *a.stream;
      if (seen) continue;
      done.push_back(*a.stream);
      cudaEvent_t event;
      cudaError_t e = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
      if (e == cudaSuccess) {
        e = cudaEventRecord(event, reinterpret_cast<cudaStream_t>(*a.stream));
        if (e == cudaSuccess) e = cudaStreamWaitEvent(stream, event, 0);
        cudaEventDestroy(event);
      }
      if (e != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error("could not order the call after the stream of " + a.name +
                                 ": " + CudaErrorString(e));
      }
    }
  }

 private:
  DeviceArray Add(DeviceArray a, bool writable) {
    if (writable && a.readonly) throw py::value_error(a.name + " is read-only");
    all_.push_back(a);
    return a;
  }

  std::optional<DeviceArray> Typed(const py::object& obj, const std::string& name, bool required,
                                   bool writable, Dtype want, const char* why) {
    if (obj.is_none()) {
      if (required) throw py::value_error(name + " is required");
      return std::nullopt;
    }
    DeviceArray a = Parse(obj, name);
    if (!Matches(want, a))
      throw py::type_error(name + " has dtype " + TypeName(a) + ", expected " + DtypeName(want) +
                           (*why ? " " : "") + why);
    return Add(std::move(a), writable);
  }

  Dtype storage_, compute_;
  std::vector<DeviceArray> all_;
};

// Sets the current device for the duration of a call, and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    if (cudaGetDevice(&previous_) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      const cudaError_t e = cudaGetLastError();
      throw std::runtime_error("cannot select GPU " + std::to_string(device) + ": " +
                               CudaErrorString(e));
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

void RequireShape(const std::optional<DeviceArray>& a, const std::vector<Index>& want,
                  const char* meaning) {
  if (a && a->shape != want)
    throw py::value_error(a->name + " must have shape " + ShapeString(want) + " " + meaning +
                          ", got " + ShapeString(a->shape));
}

void RequireSize(const std::optional<DeviceArray>& a, Index want, const char* what) {
  if (a && a->size() != want)
    throw py::value_error(a->name + " must hold " + std::to_string(want) + " elements (" + what +
                          "), got " + std::to_string(a->size()));
}

void RequireAtLeast(const DeviceArray& a, Index want) {
  if (a.size() < want)
    throw py::value_error(a.name + " must hold at least " + std::to_string(want) +
                          " elements, got " + std::to_string(a.size()));
}

// The forward inputs, checked, and the call's plan; shared by forward() and backward().
template <typename T, typename S>
struct Inputs {
  CallPlan plan;
  InputPointers<T, S> ptrs;
  std::optional<DeviceArray> x, kernel, rk, bias;
};

// `options` carries what the caller decided (training, grad_mask); the rest is read here.
template <typename T, typename S>
Inputs<T, S> ReadInputs(Arrays& arrays, CallOptions options, const std::string& cell_name,
                        const py::object& x, const py::object& h0, const py::object& c0,
                        const py::object& kernel, const py::object& rk, const py::object& bias,
                        const py::object& mask, const py::object& input_dropout,
                        const py::object& recurrent_dropout, bool time_major,
                        bool go_backwards) {
  Inputs<T, S> in;
  options.cell = ParseCell(cell_name);
  options.storage = detail::StorageOf<S>();
  const bool cell_state = Info(options.cell).cell_state;
  in.x = arrays.Storage(x, "x", true);
  const auto h0_a = arrays.Storage(h0, "h0", true);
  std::optional<DeviceArray> c0_a;
  if (cell_state) c0_a = arrays.Storage(c0, "c0", true);
  in.kernel = arrays.Float(kernel, "kernel", true);
  in.rk = arrays.Float(rk, "recurrent_kernel", true);
  in.bias = arrays.Float(bias, "bias", false);
  const auto mask_a = arrays.Mask(mask);
  const auto in_drop = arrays.Float(input_dropout, "input_dropout", false);
  const auto rec_drop = arrays.Float(recurrent_dropout, "recurrent_dropout", false);
  options.time_major = time_major, options.go_backwards = go_backwards;
  options.has_bias = in.bias.has_value(), options.has_mask = mask_a.has_value();
  options.has_input_dropout = in_drop.has_value();
  options.has_recurrent_dropout = rec_drop.has_value();
  options.input_projection = kCudaInputProjection;
  InputShapes shapes;
  shapes.x = in.x->shape, shapes.h0 = h0_a->shape, shapes.kernel = in.kernel->shape;
  shapes.recurrent_kernel = in.rk->shape;
  if (c0_a) shapes.c0 = c0_a->shape;
  if (in.bias) shapes.bias = in.bias->shape;
  if (mask_a) shapes.mask = mask_a->shape;
  if (in_drop) shapes.input_dropout = in_drop->shape;
  if (rec_drop) shapes.recurrent_dropout = rec_drop->shape;
  in.plan = MakePlan(options, shapes);
  InputPointers<T, S>& p = in.ptrs;
  p.x = in.x->template data<S>();
  p.h0 = h0_a->template data<S>();
  p.c0 = c0_a ? c0_a->template data<S>() : nullptr;
  p.kernel = in.kernel->template data<T>();
  p.recurrent_kernel = in.rk->template data<T>();
  p.bias = in.bias ? in.bias->template data<T>() : nullptr;
  p.mask = mask_a ? mask_a->template data<bool>() : nullptr;
  p.input_dropout = in_drop ? in_drop->template data<T>() : nullptr;
  p.recurrent_dropout = rec_drop ? rec_drop->template data<T>() : nullptr;
  return in;
}

template <typename T>
Span<T> SpanOf(const std::optional<DeviceArray>& a) {
  using Mutable = std::remove_const_t<T>;
  return a ? Span<T>{a->template data<Mutable>(), a->size()} : Span<T>{};
}

void Run(const std::string& error) {
  if (!error.empty()) throw std::runtime_error("tfcells CUDA: " + error);
}

// Bytes of cuBLAS workspace a call on `device` takes (raises where it cannot be asked).
Index BlasWorkspaceBytes(int device) {
  std::size_t bytes = 0;
  const std::string error = CublasWorkspaceBytes(device, &bytes);
  if (!error.empty()) throw std::runtime_error(error);
  return static_cast<Index>(bytes);
}

Index BlasWorkspaceAllocationBytes(int device) {
  return static_cast<Index>(
      BlasWorkspaceAllocation(static_cast<std::size_t>(BlasWorkspaceBytes(device))));
}

// Runs a core entry point on `stream` (an int, as Python passes it) on the arrays' device,
// after the producers of the inputs, with the GIL released; raises on a reported error.
template <typename Entry>
void Launch(Arrays& arrays, std::intptr_t stream, bool allow_tf32,
            const py::object& blas_workspace, const Entry& entry) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const std::optional<DeviceArray> w = arrays.Bytes(blas_workspace, "blas_workspace");
  const int device = arrays.Device(stream);
  DeviceGuard guard(device);
  arrays.WaitForProducers(s);
  CudaOptions options;
  options.allow_tf32 = allow_tf32;
  if (w && device >= 0) {
    const std::string error =
        UseBlasWorkspace(reinterpret_cast<void*>(w->ptr),
                         static_cast<std::size_t>(w->size()) * w->itemsize,
                         static_cast<std::size_t>(BlasWorkspaceBytes(device)), &options);
    if (!error.empty()) throw py::value_error(w->name + ": " + error);
  }
  std::string error;
  {
    py::gil_scoped_release release;
    error = entry(s, options);
  }
  Run(error);
}

template <typename T, typename S>
void Forward(Arrays& arrays, const std::string& cell_name, const py::object& x,
             const py::object& h0, const py::object& c0, const py::object& kernel,
             const py::object& rk, const py::object& bias, const py::object& mask,
             const py::object& input_dropout, const py::object& recurrent_dropout,
             const py::object& y, const py::object& h_last, const py::object& c_last,
             const py::object& gates, const py::object& aux, const py::object& h_prev,
             const py::object& workspace, bool time_major, bool go_backwards,
             std::intptr_t stream, bool allow_tf32, const py::object& blas_workspace) {
  CallOptions options;
  options.training = !gates.is_none();
  const Inputs<T, S> in =
      ReadInputs<T, S>(arrays, options, cell_name, x, h0, c0, kernel, rk, bias, mask,
                       input_dropout, recurrent_dropout, time_major, go_backwards);
  const CallPlan& plan = in.plan;
  ForwardArgs<T, S> a;
  a.plan = &plan;
  a.in = in.ptrs;
  const auto y_a = arrays.Storage(y, "y", true, true);
  RequireShape(y_a, plan.SequenceShape(plan.dims().H), "(the output sequence)");
  const auto h_last_a = arrays.Storage(h_last, "h_last", true, true);
  RequireShape(h_last_a, plan.StateShape(), "([B, H])");
  std::optional<DeviceArray> c_last_a;
  if (plan.info().cell_state) {
    c_last_a = arrays.Storage(c_last, "c_last", true, true);
    RequireShape(c_last_a, plan.StateShape(), "([B, H])");
  }
  const CacheSizes cs = plan.Cache();
  std::optional<DeviceArray> gates_a, aux_a, h_prev_a;
  if (plan.training()) {
    gates_a = arrays.Float(gates, "gates", true, true);
    aux_a = arrays.Float(aux, "aux", cs.aux > 0, true);
    h_prev_a = arrays.Float(h_prev, "h_prev", true, true);
    RequireSize(gates_a, cs.gates, "the training cache");
    RequireSize(aux_a, cs.aux, "the training cache");
    RequireSize(h_prev_a, cs.h_prev, "the training cache");
  } else if (!aux.is_none() || !h_prev.is_none()) {
    throw py::value_error("pass gates, aux and h_prev together (training) or none of them");
  }
  const auto ws = arrays.Float(workspace, "workspace", true, true);
  RequireAtLeast(*ws, plan.forward_layout().total);

  a.y = y_a->template data<S>();
  a.h_last = h_last_a->template data<S>();
  a.c_last = c_last_a ? c_last_a->template data<S>() : nullptr;
  a.gates = SpanOf<T>(gates_a), a.aux = SpanOf<T>(aux_a), a.h_prev = SpanOf<T>(h_prev_a);
  a.workspace = SpanOf<T>(ws);

  Launch(arrays, stream, allow_tf32, blas_workspace,
         [&](cudaStream_t s, const CudaOptions& o) { return ForwardCuda(a, s, o); });
}

template <typename T, typename S>
void Backward(Arrays& arrays, const std::string& cell_name, const py::object& x,
              const py::object& h0, const py::object& c0, const py::object& kernel,
              const py::object& rk, const py::object& bias, const py::object& mask,
              const py::object& input_dropout, const py::object& recurrent_dropout,
              const py::object& gates, const py::object& aux, const py::object& h_prev,
              const py::object& y, const py::object& dy, const py::object& dh_last,
              const py::object& dc_last, const py::object& dx, const py::object& dh0,
              const py::object& dc0, const py::object& dkernel, const py::object& drk,
              const py::object& dbias, const py::object& workspace, int grad_mask,
              bool time_major, bool go_backwards, std::intptr_t stream, bool allow_tf32,
              const py::object& blas_workspace) {
  CallOptions options;
  options.grad_mask = grad_mask;
  const Inputs<T, S> in =
      ReadInputs<T, S>(arrays, options, cell_name, x, h0, c0, kernel, rk, bias, mask,
                       input_dropout, recurrent_dropout, time_major, go_backwards);
  const CallPlan& plan = in.plan;
  BackwardArgs<T, S> a;
  a.plan = &plan;
  a.in = in.ptrs;
  const CacheSizes cs = plan.Cache();
  const auto gates_a = arrays.Float(gates, "gates", true);
  const auto aux_a = arrays.Float(aux, "aux", cs.aux > 0);
  const auto h_prev_a = arrays.Float(h_prev, "h_prev", cs.h_prev > 0);
  a.gates = SpanOf<const T>(gates_a), a.aux = SpanOf<const T>(aux_a);
  a.h_prev = SpanOf<const T>(h_prev_a);
  const std::string error = plan.CheckBackwardCache({a.gates.size, a.aux.size, a.h_prev.size});
  if (!error.empty()) throw py::value_error(error);
  const auto y_a = arrays.Storage(y, "y", false);  // each step's h_prev, where no cache keeps it
  const std::string y_error = plan.CheckBackwardY(y_a ? &y_a->shape : nullptr);
  if (!y_error.empty()) throw py::value_error(y_error);
  if (y_a) a.y = y_a->template data<S>();

  const auto dy_a = arrays.Storage(dy, "dy", false);
  RequireShape(dy_a, plan.SequenceShape(plan.dims().H), "(the shape of y)");
  const auto dh_last_a = arrays.Storage(dh_last, "dh_last", false);
  RequireShape(dh_last_a, plan.StateShape(), "([B, H])");
  std::optional<DeviceArray> dc_last_a;
  if (plan.info().cell_state) {
    dc_last_a = arrays.Storage(dc_last, "dc_last", false);
    RequireShape(dc_last_a, plan.StateShape(), "([B, H])");
  }
  a.dy = dy_a ? dy_a->template data<S>() : nullptr;
  a.dh_last = dh_last_a ? dh_last_a->template data<S>() : nullptr;
  a.dc_last = dc_last_a ? dc_last_a->template data<S>() : nullptr;

  // In kGradients order (the keyword arguments are named after its outputs).
  const py::object* outputs[] = {&dx, &dh0, &dc0, &dkernel, &drk, &dbias};
  for (int i = 0; i < 6; ++i) {
    const GradientInfo& g = kGradients[i];
    if (!plan.wants(g.bit)) continue;  // not requested: the argument is ignored
    const std::string name = std::string(g.output) + " (requested by grad_mask)";
    const auto out = IsStateGradient(g.bit) ? arrays.Storage(*outputs[i], name, true, true)
                                            : arrays.Float(*outputs[i], name, true, true);
    RequireShape(out, plan.GradShape(g.bit), "(the shape of its input)");
    SetGradient(a, g.bit, out->template data<void>());
  }
  const auto ws = arrays.Float(workspace, "workspace", true, true);
  RequireAtLeast(*ws, plan.backward_layout().total);
  a.workspace = SpanOf<T>(ws);

  Launch(arrays, stream, allow_tf32, blas_workspace,
         [&](cudaStream_t s, const CudaOptions& o) { return BackwardCuda(a, s, o); });
}

// The `storage` argument of the calls and the size helpers: None (the compute type's own),
// "bfloat16" or "float16".
Storage StorageOption(const py::object& storage) {
  if (storage.is_none()) return Storage::kCompute;
  const std::string name = py::str(storage);
  if (name == "bfloat16") return Storage::kBFloat16;
  if (name == "float16") return Storage::kFloat16;
  throw py::value_error("storage must be None, 'bfloat16' or 'float16', got '" + name + "'");
}

// The dtype of a call's storage arrays: the one `storage` names, else x's (float32, float64,
// float16).
Dtype StorageDtype(const py::object& x, const py::object& storage) {
  switch (StorageOption(storage)) {
    case Storage::kBFloat16: return Dtype::kBFloat16;
    case Storage::kFloat16: return Dtype::kFloat16;
    case Storage::kCompute: break;
  }
  const DeviceArray a = Parse(x, "x");
  for (Dtype d : {Dtype::kFloat32, Dtype::kFloat64, Dtype::kFloat16})
    if (Matches(d, a)) return d;
  throw py::type_error("x has dtype " + TypeName(a) +
                       ", expected float32, float64 or float16 (bfloat16: pass its bits as "
                       "2-byte integers with storage='bfloat16')");
}

template <typename Compute, typename Store>
struct CallTypes {
  using T = Compute;
  using S = Store;
};

// Runs fn(CallTypes<T, S>{}, arrays) for the call's types: (float, float), (double, double),
// or float32 compute over 16-bit storage.
template <typename F>
void WithTypes(const py::object& x, const py::object& storage, const F& fn) {
  const Dtype s = StorageDtype(x, storage);
  switch (s) {
    case Dtype::kFloat64: {
      Arrays arrays(s, s);
      return fn(CallTypes<double, double>{}, arrays);
    }
    case Dtype::kFloat16: {
      Arrays arrays(s, Dtype::kFloat32);
      return fn(CallTypes<float, float16>{}, arrays);
    }
    case Dtype::kBFloat16: {
      Arrays arrays(s, Dtype::kFloat32);
      return fn(CallTypes<float, bfloat16>{}, arrays);
    }
    default: {
      Arrays arrays(s, s);
      return fn(CallTypes<float, float>{}, arrays);
    }
  }
}

void ForwardAny(const std::string& cell, const py::object& x, const py::object& h0,
                const py::object& c0, const py::object& kernel, const py::object& rk,
                const py::object& bias, const py::object& mask, const py::object& y,
                const py::object& h_last, const py::object& c_last, const py::object& gates,
                const py::object& aux, const py::object& h_prev, const py::object& workspace,
                bool time_major, bool go_backwards, std::intptr_t stream, bool allow_tf32,
                const py::object& input_dropout, const py::object& recurrent_dropout,
                const py::object& storage, const py::object& blas_workspace) {
  WithTypes(x, storage, [&](auto types, Arrays& arrays) {
    using Types = decltype(types);
    Forward<typename Types::T, typename Types::S>(
        arrays, cell, x, h0, c0, kernel, rk, bias, mask, input_dropout, recurrent_dropout, y,
        h_last, c_last, gates, aux, h_prev, workspace, time_major, go_backwards, stream,
        allow_tf32, blas_workspace);
  });
}

void BackwardAny(const std::string& cell, const py::object& x, const py::object& h0,
                 const py::object& c0, const py::object& kernel, const py::object& rk,
                 const py::object& bias, const py::object& mask, const py::object& gates,
                 const py::object& aux, const py::object& h_prev, const py::object& dy,
                 const py::object& dh_last, const py::object& dc_last, const py::object& dx,
                 const py::object& dh0, const py::object& dc0, const py::object& dkernel,
                 const py::object& drk, const py::object& dbias, const py::object& workspace,
                 int grad_mask, bool time_major, bool go_backwards, std::intptr_t stream,
                 bool allow_tf32, const py::object& input_dropout,
                 const py::object& recurrent_dropout, const py::object& storage,
                 const py::object& y, const py::object& blas_workspace) {
  WithTypes(x, storage, [&](auto types, Arrays& arrays) {
    using Types = decltype(types);
    Backward<typename Types::T, typename Types::S>(
        arrays, cell, x, h0, c0, kernel, rk, bias, mask, input_dropout, recurrent_dropout, gates,
        aux, h_prev, y, dy, dh_last, dc_last, dx, dh0, dc0, dkernel, drk, dbias, workspace,
        grad_mask, time_major, go_backwards, stream, allow_tf32, blas_workspace);
  });
}

// The plan of a call of these sizes (for the size helpers, before any array exists).
CallPlan SizesPlan(const std::string& cell_name, Index T, Index B, Index I, Index H,
                   CallOptions options) {
  if (T < 0 || B < 0 || I < 0 || H < 0) throw py::value_error("sizes must be non-negative");
  options.cell = ParseCell(cell_name);
  options.input_projection = kCudaInputProjection;
  Dims d;
  d.T = T, d.B = B, d.I = I, d.H = H;
  return MakePlan(options, CallPlan::ShapesFor(options, d));
}

// The options a size helper's plan is made with: everything the call's plan reads that the
// sizes depend on (go_backwards keeps the h_prev cache; a call without bias needs room for a
// zero bias), so that the helpers answer exactly what the calls then ask for.
CallOptions SizeOptions(bool training, int grad_mask, bool has_bias, bool input_dropout,
                        bool recurrent_dropout, bool go_backwards, const py::object& storage) {
  CallOptions o;
  o.training = training, o.grad_mask = grad_mask, o.has_bias = has_bias;
  o.has_input_dropout = input_dropout, o.has_recurrent_dropout = recurrent_dropout;
  o.go_backwards = go_backwards;
  o.storage = StorageOption(storage);
  return o;
}

py::dict ForwardSizes(const std::string& cell_name, Index T, Index B, Index I, Index H,
                      bool training, bool input_dropout, bool recurrent_dropout,
                      const py::object& storage, bool go_backwards, bool has_bias) {
  const CallPlan plan = SizesPlan(cell_name, T, B, I, H,
                                  SizeOptions(training, kGradAll, has_bias, input_dropout,
                                              recurrent_dropout, go_backwards, storage));
  const CacheSizes cs = plan.Cache();
  py::dict out;
  out["gates"] = cs.gates, out["aux"] = cs.aux, out["h_prev"] = cs.h_prev;
  out["workspace"] = plan.forward_layout().total;
  return out;
}

Index BackwardSize(const std::string& cell_name, Index T, Index B, Index I, Index H,
                   int grad_mask, bool has_bias, bool input_dropout, bool recurrent_dropout,
                   const py::object& storage, bool go_backwards) {
  return SizesPlan(cell_name, T, B, I, H,
                   SizeOptions(true, grad_mask, has_bias, input_dropout, recurrent_dropout,
                               go_backwards, storage))
      .backward_layout()
      .total;
}

// Raises on a CUDA error other than "no driver" or "no device", so that a broken GPU set-up
// (an old driver, say) is not taken for a machine without a GPU.
int DeviceCount() {
  int driver = 0, runtime = 0, count = 0;
  const std::string error = CudaDevices(&driver, &runtime, &count);
  if (!error.empty()) throw std::runtime_error(error);
  return count;
}

py::dict CudaVersions() {
  int driver = 0, runtime = 0, count = 0;
  const std::string error = CudaDevices(&driver, &runtime, &count);
  py::dict out;
  out["driver"] = driver;  // 0: no NVIDIA driver installed
  out["runtime"] = runtime;
  out["built_with"] = CUDART_VERSION;  // the toolkit that compiled this module
  out["device_count"] = count;
  out["error"] = error.empty() ? py::object(py::none()) : py::object(py::str(error));
  return out;
}

// How often each piece of work ran in this process (plan.h's counters), by name.
py::dict WorkCounts() {
  py::dict out;
  for (int i = 0; i < kNumCounters; ++i)
    out[kCounterNames[i]] = WorkCount(static_cast<Counter>(i));
  return out;
}

py::dict GraphStats() {
  const CudaGraphStats s = GetCudaGraphStats();
  py::dict out;
  out["replays"] = s.replays, out["instantiations"] = s.instantiations;
  out["updates"] = s.updates, out["direct"] = s.direct;
  out["failed_captures"] = s.failed_captures, out["cached"] = s.cached;
  out["last_failure"] = s.last_failure;
  return out;
}

std::string CublasLibrary() {
  bool ok = false;
  const std::string what = CudaBlasLibrary(&ok);
  if (!ok) throw std::runtime_error(what);
  return what;
}

}  // namespace
}  // namespace tfcells

PYBIND11_MODULE(_tfcells_cuda, m) {
  using namespace pybind11::literals;
  m.doc() =
      "tfcells CUDA kernels over device memory (__cuda_array_interface__), without "
      "TensorFlow. The caller allocates outputs, cache and workspace (see forward_sizes, "
      "backward_workspace_size); calls enqueue work on `stream` and do not synchronise.";
  const py::none none;
  m.def("forward", &tfcells::ForwardAny, "cell"_a, "x"_a, "h0"_a, "c0"_a, "kernel"_a,
        "recurrent_kernel"_a, "bias"_a, "mask"_a, py::kw_only(), "y"_a, "h_last"_a,
        "c_last"_a = none, "gates"_a = none, "aux"_a = none, "h_prev"_a = none, "workspace"_a,
        "time_major"_a = false, "go_backwards"_a = false, "stream"_a = 0,
        "allow_tf32"_a = false, "input_dropout"_a = none, "recurrent_dropout"_a = none,
        "storage"_a = none, "blas_workspace"_a = none,
        "Forward pass. Training when gates/aux/h_prev (the cache) are given. Optional dropout "
        "masks input_dropout [G, B, I] and recurrent_dropout [G, B, H]: gate g reads "
        "x * input_dropout[g] and h_prev * recurrent_dropout[g] at every step. 16-bit storage "
        "(x float16, or storage='bfloat16' with the bits as 2-byte integers): x, the states "
        "and the outputs in it; weights, masks, cache and workspace float32; the GEMMs "
        "may round their operands to the 16-bit type.");
  m.def("backward", &tfcells::BackwardAny, "cell"_a, "x"_a, "h0"_a, "c0"_a, "kernel"_a,
        "recurrent_kernel"_a, "bias"_a, "mask"_a, "gates"_a, "aux"_a, "h_prev"_a, "dy"_a,
        "dh_last"_a, "dc_last"_a, py::kw_only(), "dx"_a = none, "dh0"_a = none, "dc0"_a = none,
        "dkernel"_a = none, "drecurrent_kernel"_a = none, "dbias"_a = none, "workspace"_a,
        "grad_mask"_a = static_cast<int>(tfcells::kGradAll), "time_major"_a = false,
        "go_backwards"_a = false, "stream"_a = 0, "allow_tf32"_a = false,
        "input_dropout"_a = none, "recurrent_dropout"_a = none, "storage"_a = none,
        "y"_a = none, "blas_workspace"_a = none,
        "Backward pass: writes the gradients named by grad_mask into the given arrays (the "
        "forward's dropout masks, if any, passed again, and its output y, from which the "
        "pass reads each step's h_prev unless the cache has it: go_backwards, 16-bit "
        "storage). 16-bit storage: dy, dh_last, dc_last, "
        "dx, dh0 and dc0 in it, the weight gradients float32.");
  m.def("forward_sizes", &tfcells::ForwardSizes, "cell"_a, "T"_a, "B"_a, "I"_a, "H"_a,
        "training"_a = true, py::kw_only(), "input_dropout"_a = false,
        "recurrent_dropout"_a = false, "storage"_a = none, "go_backwards"_a = false,
        "has_bias"_a = true,
        "Element counts of the training cache (gates, aux, h_prev) and the forward workspace "
        "of a call with these options (the workspace grows with each dropout mask and without "
        "a bias; go_backwards keeps h_prev in the cache).");
  m.def("backward_workspace_size", &tfcells::BackwardSize, "cell"_a, "T"_a, "B"_a, "I"_a,
        "H"_a, "grad_mask"_a = static_cast<int>(tfcells::kGradAll), "has_bias"_a = true,
        py::kw_only(), "input_dropout"_a = false, "recurrent_dropout"_a = false,
        "storage"_a = none, "go_backwards"_a = false);
  m.def("device_count", &tfcells::DeviceCount,
        "CUDA devices visible: 0 when there is no NVIDIA driver or no device; raises "
        "RuntimeError with CUDA's error name and text for any other failure (e.g. a driver "
        "older than the CUDA runtime this module was built with).");
  m.def("cuda_versions", &tfcells::CudaVersions,
        "{driver, runtime, built_with, device_count, error}: CUDA versions as 1000 * major + "
        "10 * minor (driver 0: none installed), and what device_count() would raise (or None).");
  m.def("cublas_workspace_bytes", &tfcells::BlasWorkspaceBytes, "device"_a = 0,
        "Bytes of cuBLAS workspace the calls' blas_workspace must hold on `device` (from its "
        "first 256-byte boundary): NVIDIA's recommended size for the architecture.");
  m.def("blas_workspace_allocation_bytes", &tfcells::BlasWorkspaceAllocationBytes,
        "device"_a = 0,
        "Bytes of device memory to allocate for the calls' blas_workspace on `device`: they "
        "hold cublas_workspace_bytes(device) from their first 256-byte boundary on, wherever "
        "they start.");
  m.def("work_counts", &tfcells::WorkCounts,
        "{counter: count} of the work this module's calls did (WORK_COUNTERS); a replayed "
        "CUDA graph counts what its capture counted.");
  m.def("graph_stats", &tfcells::GraphStats,
        "Counts of this process' whole-call CUDA graphs: {replays, instantiations, updates, "
        "direct, failed_captures, cached} and last_failure (why the last failed capture "
        "failed). A call given a blas_workspace replays its graph when it repeats with the same "
        "shapes and buffers; TFCELLS_CUDA_GRAPHS=0 launches every call directly.");
  m.def("cublas_library", &tfcells::CublasLibrary,
        "The cuBLAS file the kernels use (loading it); raises RuntimeError if none loads.");
  tfcells::AddTables(m);
}
