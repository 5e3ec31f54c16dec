// What both pybind11 modules (NumPy/CPU and CUDA) share: the cell names they accept, the
// dropout-mask check and the gradient-mask constants they export.
#pragma once

#include <pybind11/pybind11.h>

#include <map>
#include <string>
#include <vector>

#include "../core/rnn.h"

namespace tfcells {

inline CellKind ParseCell(const std::string& name) {
  static const std::map<std::string, CellKind> cells = {
      {"lstm", CellKind::kLstm},
      {"gru", CellKind::kGruResetAfter},
      {"gru_reset_before", CellKind::kGruResetBefore},
      {"simple_rnn", CellKind::kSimpleRnn}};
  auto it = cells.find(name);
  if (it == cells.end())
    throw pybind11::value_error(
        "cell must be lstm, gru, gru_reset_before or simple_rnn, got " + name);
  return it->second;
}

// Checks the shapes of the optional dropout masks (null: absent) against valid dims, raising
// ValueError; says which are present, for the workspace size.
inline DropoutInputs CheckDropout(CellKind cell, const Dims& d,
                                  const std::vector<Index>* input_dropout,
                                  const std::vector<Index>* recurrent_dropout) {
  const std::string error = ValidateDropoutShapes(cell, d, input_dropout, recurrent_dropout);
  if (!error.empty()) throw pybind11::value_error(error);
  return {input_dropout != nullptr, recurrent_dropout != nullptr};
}

inline void AddGradBits(pybind11::module_& m) {
  m.attr("GRAD_X") = static_cast<int>(kGradX);
  m.attr("GRAD_H0") = static_cast<int>(kGradH0);
  m.attr("GRAD_C0") = static_cast<int>(kGradC0);
  m.attr("GRAD_KERNEL") = static_cast<int>(kGradKernel);
  m.attr("GRAD_RECURRENT_KERNEL") = static_cast<int>(kGradRecurrentKernel);
  m.attr("GRAD_BIAS") = static_cast<int>(kGradBias);
  m.attr("GRAD_ALL") = static_cast<int>(kGradAll);
}

}  // namespace tfcells
