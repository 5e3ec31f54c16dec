#include <sstream>

#include "rnn.h"

namespace tfcells {

WorkCounters& Counters() {
  static WorkCounters counters;
  return counters;
}

namespace {

std::string ShapeString(const std::vector<Index>& s) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << "]";
  return out.str();
}

std::string Mismatch(const char* name, const std::vector<Index>& got,
                     const std::vector<Index>& want, const char* meaning) {
  return std::string(name) + " must have shape " + ShapeString(want) + " " + meaning +
         ", got " + ShapeString(got);
}

}  // namespace

std::string ValidateShapes(CellKind cell, bool time_major, const std::vector<Index>& x,
                           const std::vector<Index>& h0, const std::vector<Index>& c0,
                           const std::vector<Index>& kernel,
                           const std::vector<Index>& recurrent_kernel,
                           const std::vector<Index>* bias, const std::vector<Index>* mask,
                           Dims* dims) {
  const Index G = GateCount(cell);
  if (x.size() != 3)
    return std::string("x must have rank 3 (") + (time_major ? "[T, B, I]" : "[B, T, I]") +
           "), got shape " + ShapeString(x);
  if (recurrent_kernel.size() != 2 || recurrent_kernel[1] != G * recurrent_kernel[0])
    return "recurrent_kernel must have shape [H, " + std::to_string(G) + "*H], got " +
           ShapeString(recurrent_kernel);
  Dims d;
  d.time_major = time_major;
  d.T = time_major ? x[0] : x[1];
  d.B = time_major ? x[1] : x[0];
  d.I = x[2];
  d.H = recurrent_kernel[0];
  const Index GH = G * d.H;
  const char* from = "(I from x, H from recurrent_kernel)";
  if (kernel != std::vector<Index>{d.I, GH}) return Mismatch("kernel", kernel, {d.I, GH}, from);
  if (h0 != std::vector<Index>{d.B, d.H})
    return Mismatch("h0", h0, {d.B, d.H}, "(B from x, H from recurrent_kernel)");
  if (cell == CellKind::kLstm && c0 != std::vector<Index>{d.B, d.H})
    return Mismatch("c0", c0, {d.B, d.H}, "(B from x, H from recurrent_kernel)");
  if (bias) {
    const std::vector<Index> want =
        cell == CellKind::kGruResetAfter ? std::vector<Index>{2, GH} : std::vector<Index>{GH};
    const char* meaning = cell == CellKind::kGruResetAfter
                              ? "(input and recurrent bias, as GRU reset_after=True keeps them)"
                          : cell == CellKind::kGruResetBefore
                              ? "(one bias, as GRU reset_after=False keeps it)"
                              : "(H from recurrent_kernel)";
    if (*bias != want) return Mismatch("bias", *bias, want, meaning);
  }
  if (mask) {
    const std::vector<Index> want =
        time_major ? std::vector<Index>{d.T, d.B} : std::vector<Index>{d.B, d.T};
    if (*mask != want)
      return Mismatch("mask", *mask, want, time_major ? "([T, B] like x)" : "([B, T] like x)");
  }
  // The CPU BLAS takes 32-bit sizes and leading dimensions (the largest: all T*B rows, and a
  // batch-major row of the gates, T*G*H): refuse what would overflow them.
  const Index kMaxBlasSize = 2147483647;
  if (d.T * d.B > kMaxBlasSize || d.T * GH > kMaxBlasSize || d.I > kMaxBlasSize ||
      d.T * d.I > kMaxBlasSize)
    return "x of shape " + ShapeString(x) + " with H = " + std::to_string(d.H) +
           " is too large: T*B rows and T*" + std::to_string(G) +
           "*H must each stay below 2^31 (split the sequence or the batch)";
  *dims = d;
  return "";
}

std::string ValidateDropoutShapes(CellKind cell, const Dims& d,
                                  const std::vector<Index>* input_dropout,
                                  const std::vector<Index>* recurrent_dropout) {
  const Index G = GateCount(cell);
  const char* meaning = "(one mask per gate and batch entry, the same at every step)";
  if (input_dropout && *input_dropout != std::vector<Index>{G, d.B, d.I})
    return Mismatch("input_dropout", *input_dropout, {G, d.B, d.I}, meaning);
  if (recurrent_dropout && *recurrent_dropout != std::vector<Index>{G, d.B, d.H})
    return Mismatch("recurrent_dropout", *recurrent_dropout, {G, d.B, d.H}, meaning);
  return "";
}

}  // namespace tfcells
