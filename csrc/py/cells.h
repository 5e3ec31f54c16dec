// What both pybind11 modules (NumPy/CPU and CUDA) share: the cell names they accept.
#pragma once

#include <pybind11/pybind11.h>

#include <map>
#include <string>

#include "../core/common.h"

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

}  // namespace tfcells
