#include "plan.h"

#include <algorithm>
#include <atomic>

#include "cells.h"

namespace tfcells {

std::string ShapeString(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

namespace {

std::string Mismatch(const char* name, const Shape& got, const Shape& want,
                     const std::string& meaning) {
  return std::string(name) + " must have shape " + ShapeString(want) + " " + meaning +
         ", got " + ShapeString(got);
}

// recurrent_kernel fixes H. When it is malformed, the H the kernel implies (or its own
// columns) gives the message a concrete shape to show.
std::string RecurrentKernelError(const InputShapes& s, int G) {
  const Shape& rk = s.recurrent_kernel;
  std::string error = "recurrent_kernel must have shape [H, " + std::to_string(G) +
                      "*H], got " + ShapeString(rk);
  Index H = -1;
  std::string source;
  if (s.kernel.size() == 2 && s.kernel[1] % G == 0) {
    H = s.kernel[1] / G;
    source = "kernel's " + std::to_string(s.kernel[1]) + " columns";
  } else if (rk.size() == 2 && rk[1] % G == 0) {
    H = rk[1] / G;
    source = "its " + std::to_string(rk[1]) + " columns";
  }
  if (H >= 0)
    error += "; with H = " + std::to_string(H) + " from " + source + " that is " +
             ShapeString({H, G * H});
  return error;
}

}  // namespace

std::string CallPlan::Make(const CallOptions& o, const InputShapes& s, CallPlan* plan) {
  const CellInfo info = Info(o.cell);
  const Index G = info.gates;
  if (s.x.size() != 3)
    return std::string("x must have rank 3 (") + (o.time_major ? "[T, B, I]" : "[B, T, I]") +
           "), got shape " + ShapeString(s.x);
  for (Index e : s.x)
    if (e < 0) return "x has a negative extent: " + ShapeString(s.x);
  const Shape& rk = s.recurrent_kernel;
  if (rk.size() != 2 || rk[1] != G * rk[0] || rk[0] < 0) return RecurrentKernelError(s, G);
  Dims d;
  d.time_major = o.time_major;
  d.go_backwards = o.go_backwards;
  d.T = o.time_major ? s.x[0] : s.x[1];
  d.B = o.time_major ? s.x[1] : s.x[0];
  d.I = s.x[2];
  d.H = rk[0];
  const Index GH = G * d.H;
  if (s.kernel != Shape{d.I, GH})
    return Mismatch("kernel", s.kernel, {d.I, GH}, "(I from x, H from recurrent_kernel)");
  const char* state_meaning = "(B from x, H from recurrent_kernel)";
  if (s.h0 != Shape{d.B, d.H}) return Mismatch("h0", s.h0, {d.B, d.H}, state_meaning);
  if (info.cell_state && s.c0 != Shape{d.B, d.H})
    return Mismatch("c0", s.c0, {d.B, d.H}, state_meaning);
  if (o.has_bias) {
    const Shape want = info.bias_rows == 2 ? Shape{2, GH} : Shape{GH};
    const char* meaning = info.bias_rows == 2
                              ? "(input and recurrent bias, as GRU reset_after=True keeps them)"
                          : info.split_candidate ? "(one bias, as GRU reset_after=False keeps it)"
                                                 : "(H from recurrent_kernel)";
    if (s.bias != want) return Mismatch("bias", s.bias, want, meaning);
  }
  if (o.has_mask) {
    const Shape want = o.time_major ? Shape{d.T, d.B} : Shape{d.B, d.T};
    if (s.mask != want)
      return Mismatch("mask", s.mask, want, o.time_major ? "([T, B] like x)" : "([B, T] like x)");
  }
  const char* dropout_meaning = "(one mask per gate and batch entry, the same at every step)";
  if (o.has_input_dropout && s.input_dropout != Shape{G, d.B, d.I})
    return Mismatch("input_dropout", s.input_dropout, {G, d.B, d.I}, dropout_meaning);
  if (o.has_recurrent_dropout && s.recurrent_dropout != Shape{G, d.B, d.H})
    return Mismatch("recurrent_dropout", s.recurrent_dropout, {G, d.B, d.H}, dropout_meaning);
  // The CPU BLAS takes 32-bit sizes and leading dimensions (the largest: all T*B rows, and a
  // batch-major row of the gates, T*G*H): refuse what would overflow them.
  const Index kMaxBlasSize = 2147483647;
  if (d.T * d.B > kMaxBlasSize || d.T * GH > kMaxBlasSize || d.I > kMaxBlasSize ||
      d.T * d.I > kMaxBlasSize)
    return "x of shape " + ShapeString(s.x) + " with H = " + std::to_string(d.H) +
           " is too large: T*B rows and T*" + std::to_string(G) +
           "*H must each stay below 2^31 (split the sequence or the batch)";
  if (o.grad_mask & ~kGradAll)
    return "grad_mask " + std::to_string(o.grad_mask) + " has bits beyond kGradAll";

  plan->options_ = o;
  plan->info_ = info;
  // Where no gates cache takes them (inference, GatesFromY), projection_steps steps'
  // projections stay in the workspace: at most kMaxProjectionSlots elements of them (a larger
  // layer projects fewer steps at a time).
  const Index kMaxProjectionSlots = Index(1) << 24;
  Index steps = std::min(o.projection_steps, d.T);
  if (!plan->ProjectsIntoCache() && d.B * GH > 0)
    steps = std::min(steps, kMaxProjectionSlots / (d.B * GH));
  plan->options_.projection_steps = std::max<Index>(1, steps);
  if (!info.cell_state) plan->options_.grad_mask &= ~kGradC0;
  if (!o.has_bias) plan->options_.grad_mask &= ~kGradBias;
  plan->dims_ = d;
  plan->shapes_ = s;
  if (!info.cell_state) plan->shapes_.c0.clear();
  if (!o.has_bias) plan->shapes_.bias = {0};
  plan->Layout();
  return "";
}

InputShapes CallPlan::ShapesFor(const CallOptions& o, const Dims& d) {
  const CellInfo info = Info(o.cell);
  const Index G = info.gates;
  InputShapes s;
  s.x = o.time_major ? Shape{d.T, d.B, d.I} : Shape{d.B, d.T, d.I};
  s.h0 = s.c0 = {d.B, d.H};
  s.kernel = {d.I, G * d.H};
  s.recurrent_kernel = {d.H, G * d.H};
  s.bias = info.bias_rows == 2 ? Shape{2, G * d.H} : Shape{G * d.H};
  s.mask = o.time_major ? Shape{d.T, d.B} : Shape{d.B, d.T};
  s.input_dropout = {G, d.B, d.I};
  s.recurrent_dropout = {G, d.B, d.H};
  return s;
}

Shape CallPlan::SequenceShape(Index width) const {
  return dims_.time_major ? Shape{dims_.T, dims_.B, width} : Shape{dims_.B, dims_.T, width};
}

const Shape& CallPlan::GradShape(GradBit bit) const {
  static const Shape kEmpty{0};
  switch (bit) {
    case kGradX: return shapes_.x;
    case kGradH0: return shapes_.h0;
    case kGradC0: return info_.cell_state ? shapes_.c0 : kEmpty;
    case kGradKernel: return shapes_.kernel;
    case kGradRecurrentKernel: return shapes_.recurrent_kernel;
    case kGradBias: return shapes_.bias;
    default: return kEmpty;
  }
}

bool CallPlan::ReadsHPrev() const {
  return options_.training &&
         (info_.pointwise_reads_h_prev || (options_.grad_mask & kGradRecurrentKernel));
}

bool CallPlan::GatesFromY() const {
  return options_.training && info_.gate_is_state && options_.storage == Storage::kCompute;
}

bool CallPlan::HPrevFromY() const {
  return options_.storage == Storage::kCompute && !options_.go_backwards;
}

CacheSizes CallPlan::Cache() const {
  if (!options_.training) return {};
  const Index rows = dims_.Rows();
  return {GatesFromY() ? 0 : rows * info_.gates * dims_.H,
          info_.aux == Aux::kNone ? 0 : rows * dims_.H,
          ReadsHPrev() && !HPrevFromY() ? rows * dims_.H : 0};
}

bool CallPlan::KeepsAllGateGrads() const {
  const int m = options_.grad_mask;
  const bool dx_after_loop =
      options_.input_projection == InputProjection::kWholeSequence && (m & kGradX);
  // dW_h reads them too, unless the cell keeps its recurrent side's own (dgates_rec).
  const int weights = info_.recurrent_gate_grads ? kGradKernel : kGradKernel | kGradRecurrentKernel;
  return (m & weights) || dx_after_loop;
}

namespace {

// Hands out consecutive segments, each starting on a 64-byte boundary for elements of up to
// 8 bytes (the workspace itself comes 64-byte aligned from every allocator that fills it).
class Carver {
 public:
  Segment Take(Index size) {
    const Index kAlign = 16;
    total_ = (total_ + kAlign - 1) / kAlign * kAlign;
    const Segment s{size ? total_ : 0, size};
    total_ += size;
    return s;
  }
  Index total() const { return total_; }

 private:
  Index total_ = 0;
};

}  // namespace

// The one definition of both workspaces: the driver carves exactly these segments.
void CallPlan::Layout() {
  const Dims& d = dims_;
  const Index B = d.B, H = d.H, GH = info_.gates * H, rows = d.Rows();
  const bool per_step = options_.input_projection == InputProjection::kPerStep;
  const bool in_dropout = options_.has_input_dropout, rec_dropout = options_.has_recurrent_dropout;
  const bool training = options_.training;
  const bool staged = options_.storage != Storage::kCompute;
  {
    Carver c;
    forward_.input_projection =
        c.Take(ProjectsIntoCache() ? 0 : (per_step ? options_.projection_steps * B : rows) * GH);
    forward_.recurrent = c.Take(B * GH);
    forward_.state = c.Take(!training && info_.aux == Aux::kState ? 2 * B * H : 0);
    forward_.dropped_x = c.Take(in_dropout ? (per_step ? B : rows) * d.I : 0);
    forward_.dropped_h = c.Take(rec_dropout ? B * H : 0);
    forward_.zero_bias = c.Take(options_.has_bias ? 0 : info_.bias_rows * GH);
    if (staged) {
      StagedTensors& st = forward_.staged;
      st.x = c.Take(rows * d.I);
      st.h0 = c.Take(B * H);
      st.c0 = c.Take(info_.cell_state ? B * H : 0);
      st.y = c.Take(rows * H);
      st.h_last = c.Take(B * H);
      st.c_last = c.Take(info_.cell_state ? B * H : 0);
    }
    forward_.total = c.total();
  }
  const int m = options_.grad_mask;
  Carver c;
  // Gate gradients: every step's, or two alternating slots (one step's may be written while
  // the step after's is still read: rnn.h).
  const Index dgates_slots = per_step && (m & kGradX) ? options_.projection_steps + 1 : 2;
  // Where the recurrence carries the recurrent side's own gate gradients (GRU reset_after),
  // the input side's serve only dx and dW_x (db's sums are added up in the pointwise pass).
  const bool input_side_read = !info_.recurrent_gate_grads || (m & (kGradX | kGradKernel));
  backward_.dgates =
      c.Take(input_side_read ? (KeepsAllGateGrads() ? rows : dgates_slots * B) * GH : 0);
  backward_.dgates_rec =
      c.Take(info_.recurrent_gate_grads ? ((m & kGradRecurrentKernel) ? rows : 2 * B) * GH : 0);
  backward_.bias_sums = c.Take((m & kGradBias) ? info_.bias_rows * B * GH : 0);
  backward_.dh = c.Take(B * H);
  backward_.dc = c.Take(info_.cell_state ? B * H : 0);
  backward_.d_reset = c.Take(info_.split_candidate ? B * H : 0);
  // Dropout: x or the h_prev cache under one gate's mask for the weight GEMMs (the backend's
  // MaskedGemms writes it out whole, or packs a chunk at a time there), or one gate's share of
  // dx over all rows.
  const bool masked_x = in_dropout && ((m & kGradKernel) || (!per_step && (m & kGradX)));
  const bool masked_h = rec_dropout && (m & kGradRecurrentKernel);
  backward_.masked_rows = c.Take(rows * std::max(masked_x ? d.I : 0, masked_h ? H : 0));
  backward_.step_product = c.Take(rec_dropout ? B * H : 0);
  backward_.step_dx = c.Take(in_dropout && per_step && (m & kGradX) ? B * d.I : 0);
  backward_.zero_row = c.Take(H);  // whether dy comes is known only at the call
  if (staged) {  // the backward pass reads x only for dW_x, and h_prev from the cache, not h0
    StagedTensors& st = backward_.staged;
    st.x = c.Take((m & kGradKernel) ? rows * d.I : 0);
    st.c0 = c.Take(info_.cell_state ? B * H : 0);
    st.dy = c.Take(rows * H);
    st.dh_last = c.Take(B * H);
    st.dc_last = c.Take(info_.cell_state ? B * H : 0);
    st.dx = c.Take((m & kGradX) ? rows * d.I : 0);
    st.dh0 = c.Take((m & kGradH0) ? B * H : 0);
    st.dc0 = c.Take((m & kGradC0) ? B * H : 0);
  }
  backward_.total = c.total();
}

std::string CallPlan::CheckBackwardCache(const CacheSizes& cache) const {
  CacheSizes want = Cache();
  if (!training()) return "a backward pass needs a training call plan";
  // A forward call that allowed dW_h kept h_prev, which a backward pass without it never reads.
  if (want.h_prev == 0 && cache.h_prev == dims_.Rows() * dims_.H) want.h_prev = cache.h_prev;
  const std::pair<const char*, std::pair<Index, Index>> sizes[] = {
      {"gates", {cache.gates, want.gates}},
      {"aux", {cache.aux, want.aux}},
      {"h_prev", {cache.h_prev, want.h_prev}}};
  for (const auto& [name, got_want] : sizes)
    if (got_want.first != got_want.second)
      return std::string(name) + " must hold the forward op's training cache of " +
             std::to_string(got_want.second) + " elements, got " +
             std::to_string(got_want.first);
  return "";
}

std::string CallPlan::CheckBackwardY(const Shape* y) const {
  if (!NeedsY() || (y != nullptr && *y == SequenceShape(dims_.H))) return "";
  return "y must be the forward op's output sequence, of shape " +
         ShapeString(SequenceShape(dims_.H)) + ", got " + (y ? ShapeString(*y) : "none") +
         " (the backward pass reads the states of the steps from it)";
}

std::string CallPlan::CheckBackwardInputs(const CacheSizes& cache, const Shape* y,
                                          const Shape* dy, const Shape* dh_last,
                                          const Shape* dc_last) const {
  const std::string cache_error = CheckBackwardCache(cache);
  if (!cache_error.empty()) return cache_error;
  const std::string y_error = CheckBackwardY(y);
  if (!y_error.empty()) return y_error;
  auto empty = [](const Shape* s) {
    if (s == nullptr) return true;
    Index n = 1;
    for (Index e : *s) n *= e;
    return n == 0;
  };
  const struct {
    const char* name;
    const Shape* shape;
    Shape want;
  } grads[] = {{"dy", dy, SequenceShape(dims_.H)},
               {"dh_last", dh_last, StateShape()},
               {"dc_last", info_.cell_state ? dc_last : nullptr, StateShape()}};
  for (const auto& [name, shape, want_shape] : grads) {
    if (!empty(shape) && *shape != want_shape)
      return std::string(name) + " must have shape " + ShapeString(want_shape) +
             " or be empty, got " + ShapeString(*shape);
  }
  return "";
}

namespace {
std::atomic<std::int64_t> counters[kNumCounters];
thread_local WorkRecorder* recorder = nullptr;
}  // namespace

void CountWork(Counter c) {
  counters[c].fetch_add(1, std::memory_order_relaxed);
  if (recorder != nullptr) ++recorder->counts[c];
}
std::int64_t WorkCount(Counter c) { return counters[c].load(std::memory_order_relaxed); }
void AddWork(Counter c, std::int64_t n) { counters[c].fetch_add(n, std::memory_order_relaxed); }

WorkRecorder::WorkRecorder() : outer_(recorder) { recorder = this; }
WorkRecorder::~WorkRecorder() { recorder = outer_; }

}  // namespace tfcells
