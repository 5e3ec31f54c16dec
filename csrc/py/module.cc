// pybind11 module over the core, without TensorFlow: NumPy arrays on the CPU. Used by tests
// and to check kernels on machines that have no TensorFlow.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <type_traits>

#include "../bench/products.h"
#include "../core/cpu/cpu_rnn.h"
#include "cells.h"

namespace py = pybind11;

namespace tfcells {
namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

Shape ShapeOf(const py::array& a) {
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

// The options of a call from its arguments (an absent optional input is None).
template <typename T>
CallOptions Options(const std::string& cell_name, bool time_major, bool go_backwards,
                    const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
                    const std::optional<Array<T>>& input_dropout,
                    const std::optional<Array<T>>& recurrent_dropout) {
  CallOptions o;
  o.cell = ParseCell(cell_name);
  o.time_major = time_major, o.go_backwards = go_backwards;
  o.has_bias = bias.has_value(), o.has_mask = mask.has_value();
  o.has_input_dropout = input_dropout.has_value();
  o.has_recurrent_dropout = recurrent_dropout.has_value();
  o.input_projection = kCpuInputProjection;
  o.projection_steps = kCpuProjectionSteps;
  return o;
}

// The plan of a call over these arrays, and the pointers the core reads.
template <typename T>
CallPlan Plan(const CallOptions& o, const Array<T>& x, const Array<T>& h0,
              const std::optional<Array<T>>& c0, const Array<T>& kernel, const Array<T>& rk,
              const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
              const std::optional<Array<T>>& input_dropout,
              const std::optional<Array<T>>& recurrent_dropout, InputPointers<T>* in) {
  if (Info(o.cell).cell_state && !c0) throw py::value_error("lstm needs c0");
  InputShapes s;
  s.x = ShapeOf(x), s.h0 = ShapeOf(h0), s.kernel = ShapeOf(kernel);
  s.recurrent_kernel = ShapeOf(rk);
  if (c0) s.c0 = ShapeOf(*c0);
  if (bias) s.bias = ShapeOf(*bias);
  if (mask) s.mask = ShapeOf(*mask);
  if (input_dropout) s.input_dropout = ShapeOf(*input_dropout);
  if (recurrent_dropout) s.recurrent_dropout = ShapeOf(*recurrent_dropout);
  const CallPlan plan = MakePlan(o, s);
  in->x = x.data(), in->h0 = h0.data(), in->c0 = Ptr(c0), in->kernel = kernel.data();
  in->recurrent_kernel = rk.data(), in->bias = Ptr(bias), in->mask = mask ? mask->data() : nullptr;
  in->input_dropout = Ptr(input_dropout), in->recurrent_dropout = Ptr(recurrent_dropout);
  return plan;
}

template <typename T>
Span<T> SpanOf(Array<T>& a) {
  return {a.size() ? a.mutable_data() : nullptr, static_cast<Index>(a.size())};
}

template <typename T>
py::dict Forward(const std::string& cell_name, const Array<T>& x, const Array<T>& h0,
                 const std::optional<Array<T>>& c0, const Array<T>& kernel, const Array<T>& rk,
                 const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
                 bool time_major, bool go_backwards, bool training,
                 const std::optional<Array<T>>& input_dropout,
                 const std::optional<Array<T>>& recurrent_dropout) {
  CallOptions o = Options(cell_name, time_major, go_backwards, bias, mask, input_dropout,
                          recurrent_dropout);
  o.training = training;
  ForwardArgs<T> a;
  const CallPlan plan =
      Plan(o, x, h0, c0, kernel, rk, bias, mask, input_dropout, recurrent_dropout, &a.in);
  a.plan = &plan;
  auto y = Empty<T>(plan.SequenceShape(plan.dims().H));
  auto h_last = Empty<T>(plan.StateShape()), c_last = Empty<T>(plan.StateShape());
  const CacheSizes cs = plan.Cache();
  auto gates = Empty<T>({cs.gates}), aux = Empty<T>({cs.aux}), h_prev = Empty<T>({cs.h_prev});
  auto workspace = Empty<T>({plan.forward_layout().total});
  a.y = y.mutable_data(), a.h_last = h_last.mutable_data(), a.c_last = c_last.mutable_data();
  a.gates = SpanOf(gates), a.aux = SpanOf(aux), a.h_prev = SpanOf(h_prev);
  a.workspace = SpanOf(workspace);
  {
    py::gil_scoped_release release;
    ForwardCpu(a);
  }
  py::dict out;
  out["y"] = y, out["h_last"] = h_last, out["gates"] = gates, out["aux"] = aux;
  out["h_prev"] = h_prev;
  if (plan.info().cell_state) out["c_last"] = c_last;
  return out;
}

template <typename T>
py::dict Backward(const std::string& cell_name, const Array<T>& x, const Array<T>& h0,
                  const std::optional<Array<T>>& c0, const Array<T>& kernel, const Array<T>& rk,
                  const std::optional<Array<T>>& bias, const std::optional<Array<bool>>& mask,
                  bool time_major, bool go_backwards, const Array<T>& gates,
                  const Array<T>& aux, const Array<T>& h_prev, const std::optional<Array<T>>& dy,
                  const std::optional<Array<T>>& dh_last, const std::optional<Array<T>>& dc_last,
                  int grad_mask, const std::optional<Array<T>>& y,
                  const std::optional<Array<T>>& input_dropout,
                  const std::optional<Array<T>>& recurrent_dropout) {
  CallOptions o = Options(cell_name, time_major, go_backwards, bias, mask, input_dropout,
                          recurrent_dropout);
  o.grad_mask = grad_mask;
  BackwardArgs<T> a;
  const CallPlan plan =
      Plan(o, x, h0, c0, kernel, rk, bias, mask, input_dropout, recurrent_dropout, &a.in);
  a.plan = &plan;
  const std::vector<Index> y_shape = y ? ShapeOf(*y) : std::vector<Index>{};
  const std::vector<Index> dy_shape = dy ? ShapeOf(*dy) : std::vector<Index>{};
  const std::vector<Index> dh_shape = dh_last ? ShapeOf(*dh_last) : std::vector<Index>{};
  const std::vector<Index> dc_shape = dc_last ? ShapeOf(*dc_last) : std::vector<Index>{};
  const std::string error = plan.CheckBackwardInputs(
      {static_cast<Index>(gates.size()), static_cast<Index>(aux.size()),
       static_cast<Index>(h_prev.size())},
      y ? &y_shape : nullptr, dy ? &dy_shape : nullptr, dh_last ? &dh_shape : nullptr,
      dc_last ? &dc_shape : nullptr);
  if (!error.empty()) throw py::value_error(error);
  a.gates = {gates.data(), static_cast<Index>(gates.size())};
  a.aux = {aux.size() ? aux.data() : nullptr, static_cast<Index>(aux.size())};
  a.h_prev = {h_prev.data(), static_cast<Index>(h_prev.size())};
  a.y = Ptr(y);
  a.dy = Ptr(dy), a.dh_last = Ptr(dh_last), a.dc_last = Ptr(dc_last);
  py::dict out;
  for (const GradientInfo& g : kGradients) {
    if (!plan.wants(g.bit)) continue;
    auto arr = Empty<T>(plan.GradShape(g.bit));
    SetGradient(a, g.bit, arr.mutable_data());
    out[g.output] = arr;
  }
  auto workspace = Empty<T>({plan.backward_layout().total});
  a.workspace = SpanOf(workspace);
  {
    py::gil_scoped_release release;
    BackwardCpu(a);
  }
  return out;
}

// A step's GEMMs alone, as the ops run them (see ProductsCpu): the benchmark's GEMM floor.
template <typename T>
void Products(const Array<T>& a, const Array<T>& w, py::array_t<T, py::array::c_style> out,
              int threads, bool trans_a, bool split_units, bool bf16_pairs) {
  // a [count, m, k], or [1, k, m] read transposed
  const bool ok = a.ndim() == 3 && w.ndim() == 2 && out.ndim() == 2 &&
                  a.shape(trans_a ? 1 : 2) == w.shape(0) &&
                  out.shape(0) == a.shape(trans_a ? 2 : 1) && out.shape(1) == w.shape(1) &&
                  (!trans_a || a.shape(0) == 1);
  if (!ok)
    throw py::value_error("products needs a [count, m, k] (trans_a: [1, k, m]), w [k, n], "
                          "out [m, n]");
  if (bf16_pairs && !std::is_same_v<T, float>)
    throw py::value_error("products: bf16_pairs needs float32 operands");
  T* dst = out.mutable_data();  // throws if out is read-only
  const Index m = out.shape(0), k = w.shape(0), n = w.shape(1);
  py::gil_scoped_release release;
  ProductsCpu(a.shape(0), trans_a, m, k, n, a.data(), w.data(), dst, threads, split_units,
              bf16_pairs);
}

template <typename T>
void Bind(py::module_& m) {
  m.def("products", &Products<T>, py::arg("a"), py::arg("w"), py::arg("out"),
        py::arg("threads") = 1, py::arg("trans_a") = false, py::arg("split_units") = false,
        py::arg("bf16_pairs") = false);
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
        py::arg("y") = py::none(), py::arg("input_dropout") = py::none(),
        py::arg("recurrent_dropout") = py::none());
}

}  // namespace
}  // namespace tfcells

PYBIND11_MODULE(_tfcells_core, m) {
  m.doc() = "tfcells core kernels over NumPy arrays (no TensorFlow)";
  // pybind11 first tries each overload without conversion, so arrays of either dtype reach
  // their own instantiation.
  tfcells::Bind<float>(m);
  tfcells::Bind<double>(m);
  tfcells::AddTables(m);
  // Run-time CPU dispatch (csrc/core/cpu/cpu_rnn.h); cpu_isa raises ValueError for a bad
  // TFCELLS_CPU_ISA.
  m.def("cpu_isa", &tfcells::CpuIsa);
  m.def("cpu_isas", &tfcells::CpuIsas);
  m.def("cpu_isas_built", &tfcells::CpuIsasBuilt);
  m.def("cpu_bf16_products", &tfcells::CpuBf16Products);
}
