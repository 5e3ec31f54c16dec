// pybind11 module over the core, without TensorFlow: NumPy arrays on the CPU. Used by tests
// and to check kernels on machines that have no TensorFlow.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <optional>
#include <string>

#include "../core/cpu/cpu_rnn.h"
#include "cells.h"

namespace py = pybind11;

namespace tfcells {
namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

std::vector<Index> Shape(const py::array& a) {
  return std::vector<Index>(a.shape(), a.shape() + a.ndim());
}

template <typename T>
const T* Ptr(const std::optional<Array<T>>& a) {
  return a && a->size() ? a->data() : nullptr;
}

template <typename T>
Array<T> Empty(std::vector<Index> shape) {
  return Array<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

struct Inputs {
  CellKind cell;
  Dims d;
  DropoutInputs dropout;
};

template <typename T>
Inputs Check(const std::string& cell_name, const Array<T>& x, const Array<T>& h0,
             const std::optional<Array<T>>& c0, const Array<T>& kernel, const Array<T>& rk,
             const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
             bool time_major, bool go_backwards, const std::optional<Array<T>>& input_dropout,
             const std::optional<Array<T>>& recurrent_dropout) {
  Inputs in{ParseCell(cell_name), {}, {}};
  if (in.cell == CellKind::kLstm && !c0) throw py::value_error("lstm needs c0");
  const std::vector<Index> bias_shape = bias ? Shape(*bias) : std::vector<Index>{};
  const std::vector<Index> mask_shape = mask ? Shape(*mask) : std::vector<Index>{};
  const std::string error =
      ValidateShapes(in.cell, time_major, Shape(x), Shape(h0), c0 ? Shape(*c0) : Shape(h0),
                     Shape(kernel), Shape(rk), bias ? &bias_shape : nullptr,
                     mask ? &mask_shape : nullptr, &in.d);
  if (!error.empty()) throw py::value_error(error);
  const std::vector<Index> in_drop = input_dropout ? Shape(*input_dropout) : std::vector<Index>{};
  const std::vector<Index> rec_drop =
      recurrent_dropout ? Shape(*recurrent_dropout) : std::vector<Index>{};
  in.dropout = CheckDropout(in.cell, in.d, input_dropout ? &in_drop : nullptr,
                            recurrent_dropout ? &rec_drop : nullptr);
  in.d.go_backwards = go_backwards;
  return in;
}

template <typename T>
py::dict Forward(const std::string& cell_name, const Array<T>& x, const Array<T>& h0,
                 const std::optional<Array<T>>& c0, const Array<T>& kernel, const Array<T>& rk,
                 const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
                 bool time_major, bool go_backwards, bool training,
                 const std::optional<Array<T>>& input_dropout,
                 const std::optional<Array<T>>& recurrent_dropout) {
  const Inputs in = Check(cell_name, x, h0, c0, kernel, rk, bias, mask, time_major, go_backwards,
                          input_dropout, recurrent_dropout);
  const Dims& d = in.d;
  ForwardArgs<T> a;
  a.cell = in.cell;
  a.d = d;
  a.x = x.data(), a.h0 = h0.data(), a.c0 = Ptr(c0), a.kernel = kernel.data();
  a.recurrent_kernel = rk.data(), a.bias = Ptr(bias), a.mask = mask ? mask->data() : nullptr;
  a.input_dropout = Ptr(input_dropout), a.recurrent_dropout = Ptr(recurrent_dropout);
  auto y = Empty<T>(time_major ? std::vector<Index>{d.T, d.B, d.H}
                               : std::vector<Index>{d.B, d.T, d.H});
  auto h_last = Empty<T>({d.B, d.H}), c_last = Empty<T>({d.B, d.H});
  const CacheSizes cs = training ? TrainingCacheSizes(a.cell, d) : CacheSizes{0, 0, 0};
  auto gates = Empty<T>({cs.gates}), aux = Empty<T>({cs.aux}), h_prev = Empty<T>({cs.h_prev});
  auto workspace = Empty<T>({ForwardWorkspaceSize(a.cell, d, training, in.dropout)});
  a.y = y.mutable_data(), a.h_last = h_last.mutable_data(), a.c_last = c_last.mutable_data();
  if (training) {
    a.gates = gates.mutable_data(), a.aux = aux.mutable_data();
    a.h_prev = h_prev.mutable_data();
  }
  a.workspace = workspace.mutable_data();
  {
    py::gil_scoped_release release;
    ForwardCpu(a);
  }
  py::dict out;
  out["y"] = y, out["h_last"] = h_last, out["gates"] = gates, out["aux"] = aux;
  out["h_prev"] = h_prev;
  if (a.cell == CellKind::kLstm) out["c_last"] = c_last;
  return out;
}

template <typename T>
py::dict Backward(const std::string& cell_name, const Array<T>& x, const Array<T>& h0,
                  const std::optional<Array<T>>& c0, const Array<T>& kernel, const Array<T>& rk,
                  const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
                  bool time_major, bool go_backwards, const Array<T>& gates,
                  const Array<T>& aux, const Array<T>& h_prev, const std::optional<Array<T>>& dy,
                  const std::optional<Array<T>>& dh_last, const std::optional<Array<T>>& dc_last,
                  int grad_mask, const std::optional<Array<T>>& input_dropout,
                  const std::optional<Array<T>>& recurrent_dropout) {
  const Inputs in = Check(cell_name, x, h0, c0, kernel, rk, bias, mask, time_major, go_backwards,
                          input_dropout, recurrent_dropout);
  const Dims& d = in.d;
  const CacheSizes cs = TrainingCacheSizes(in.cell, d);
  if (gates.size() != cs.gates || aux.size() != cs.aux || h_prev.size() != cs.h_prev)
    throw py::value_error("the cache does not come from a training forward pass of this shape");
  BackwardArgs<T> a;
  a.cell = in.cell;
  a.d = d;
  a.x = x.data(), a.h0 = h0.data(), a.c0 = Ptr(c0), a.kernel = kernel.data();
  a.recurrent_kernel = rk.data(), a.bias = Ptr(bias), a.mask = mask ? mask->data() : nullptr;
  a.input_dropout = Ptr(input_dropout), a.recurrent_dropout = Ptr(recurrent_dropout);
  a.gates = gates.data(), a.aux = Ptr(std::optional<Array<T>>(aux)), a.h_prev = h_prev.data();
  const std::vector<Index> y_shape = time_major ? std::vector<Index>{d.T, d.B, d.H}
                                                : std::vector<Index>{d.B, d.T, d.H};
  if (dy && Shape(*dy) != y_shape) throw py::value_error("dy must have the shape of y");
  for (const auto* g : {&dh_last, &dc_last})
    if (*g && Shape(**g) != std::vector<Index>{d.B, d.H})
      throw py::value_error("dh_last and dc_last must have shape [B, H]");
  a.dy = Ptr(dy), a.dh_last = Ptr(dh_last), a.dc_last = Ptr(dc_last);
  if (in.cell != CellKind::kLstm) grad_mask &= ~kGradC0;
  if (!bias) grad_mask &= ~kGradBias;
  a.grad_mask = grad_mask;
  py::dict out;
  auto want = [&](int bit, const char* name, std::vector<Index> shape, T** ptr) {
    if (!(grad_mask & bit)) return;
    auto arr = Empty<T>(shape);
    *ptr = arr.mutable_data();
    out[name] = arr;
  };
  want(kGradX, "dx", Shape(x), &a.dx);
  want(kGradH0, "dh0", {d.B, d.H}, &a.dh0);
  want(kGradC0, "dc0", {d.B, d.H}, &a.dc0);
  want(kGradKernel, "dkernel", Shape(kernel), &a.dkernel);
  want(kGradRecurrentKernel, "drecurrent_kernel", Shape(rk), &a.drecurrent_kernel);
  if (bias) want(kGradBias, "dbias", Shape(*bias), &a.dbias);
  auto workspace = Empty<T>({BackwardWorkspaceSize(in.cell, d, grad_mask, in.dropout)});
  a.workspace = workspace.mutable_data();
  {
    py::gil_scoped_release release;
    BackwardCpu(a);
  }
  return out;
}

// A step's GEMMs alone, as the ops run them (see ProductsCpu): the benchmark's GEMM floor.
template <typename T>
void Products(const Array<T>& a, const Array<T>& w, py::array_t<T, py::array::c_style> out,
              int threads, bool trans_a) {
  // a [count, m, k], or [1, k, m] read transposed
  const bool ok = a.ndim() == 3 && w.ndim() == 2 && out.ndim() == 2 &&
                  a.shape(trans_a ? 1 : 2) == w.shape(0) &&
                  out.shape(0) == a.shape(trans_a ? 2 : 1) && out.shape(1) == w.shape(1) &&
                  (!trans_a || a.shape(0) == 1);
  if (!ok)
    throw py::value_error("products needs a [count, m, k] (trans_a: [1, k, m]), w [k, n], "
                          "out [m, n]");
  T* dst = out.mutable_data();  // throws if out is read-only
  const Index m = out.shape(0), k = w.shape(0), n = w.shape(1);
  py::gil_scoped_release release;
  ProductsCpu(a.shape(0), trans_a, m, k, n, a.data(), w.data(), dst, threads);
}

template <typename T>
void Bind(py::module_& m) {
  m.def("products", &Products<T>, py::arg("a"), py::arg("w"), py::arg("out"),
        py::arg("threads") = 1, py::arg("trans_a") = false);
  m.def("forward", &Forward<T>, py::arg("cell"), py::arg("x"), py::arg("h0"), py::arg("c0"),
        py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"), py::arg("mask"),
        py::arg("time_major") = false, py::arg("go_backwards") = false,
        py::arg("training") = true, py::kw_only(), py::arg("input_dropout") = py::none(),
        py::arg("recurrent_dropout") = py::none());
  m.def("backward", &Backward<T>, py::arg("cell"), py::arg("x"), py::arg("h0"), py::arg("c0"),
        py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"), py::arg("mask"),
        py::arg("time_major"), py::arg("go_backwards"), py::arg("gates"), py::arg("aux"),
        py::arg("h_prev"), py::arg("dy"), py::arg("dh_last"), py::arg("dc_last"),
        py::arg("grad_mask") = static_cast<int>(kGradAll), py::kw_only(),
        py::arg("input_dropout") = py::none(), py::arg("recurrent_dropout") = py::none());
}

}  // namespace
}  // namespace tfcells

PYBIND11_MODULE(_tfcells_core, m) {
  m.doc() = "tfcells core kernels over NumPy arrays (no TensorFlow)";
  // pybind11 first tries each overload without conversion, so arrays of either dtype reach
  // their own instantiation.
  tfcells::Bind<float>(m);
  tfcells::Bind<double>(m);
  tfcells::AddGradBits(m);
  // Run-time CPU dispatch (csrc/core/cpu/cpu_rnn.h); cpu_isa raises ValueError for a bad
  // TFCELLS_CPU_ISA.
  m.def("cpu_isa", &tfcells::CpuIsa);
  m.def("cpu_isas", &tfcells::CpuIsas);
  m.def("cpu_isas_built", &tfcells::CpuIsasBuilt);
}
