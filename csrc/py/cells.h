// What both pybind11 modules (NumPy/CPU and CUDA) share: the cell names they accept, how a
// call's options are read, and the core's tables they export to Python.
#pragma once

#include <pybind11/pybind11.h>

#include <cctype>
#include <string>

#include "../core/rnn.h"

namespace tfcells {

// The cell a name (CellInfo::name) stands for.
inline CellKind ParseCell(const std::string& name) {
  std::string names;
  for (CellKind kind : kCellKinds) {
    if (name == Info(kind).name) return kind;
    names += (names.empty() ? "" : ", ") + std::string(Info(kind).name);
  }
  throw pybind11::value_error("cell must be one of " + names + ", got " + name);
}

// The plan of a call, or ValueError with the plan's message.
inline CallPlan MakePlan(const CallOptions& options, const InputShapes& shapes) {
  CallPlan plan;
  const std::string error = CallPlan::Make(options, shapes, &plan);
  if (!error.empty()) throw pybind11::value_error(error);
  return plan;
}

// The core's tables, for Python to read by name rather than by position:
//   GRAD_X, ... GRAD_ALL; GRAD_BITS {input: bit}; GRAD_OUTPUTS {input: gradient output};
//   WORK_COUNTERS (names, in the order tfcells_work_counters writes them);
//   CELLS {name: {gates, bias_rows, cell_state}}.
inline void AddTables(pybind11::module_& m) {
  namespace py = pybind11;
  py::dict bits, outputs, cells;
  for (const GradientInfo& g : kGradients) {
    bits[g.input] = static_cast<int>(g.bit);
    outputs[g.input] = g.output;
    std::string upper = g.input;
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    m.attr(("GRAD_" + upper).c_str()) = static_cast<int>(g.bit);
  }
  m.attr("GRAD_ALL") = static_cast<int>(kGradAll);
  m.attr("GRAD_BITS") = bits;
  m.attr("GRAD_OUTPUTS") = outputs;
  py::tuple counters(static_cast<size_t>(kNumCounters));
  for (int i = 0; i < kNumCounters; ++i) counters[i] = kCounterNames[i];
  m.attr("WORK_COUNTERS") = counters;
  for (CellKind kind : kCellKinds) {
    const CellInfo info = Info(kind);
    py::dict d;
    d["gates"] = info.gates;
    d["bias_rows"] = info.bias_rows;
    d["cell_state"] = info.cell_state;
    cells[info.name] = d;
  }
  m.attr("CELLS") = cells;
}

}  // namespace tfcells
