// Self-test of the framework-free core, built and run under AddressSanitizer and
// UndefinedBehaviorSanitizer in CI (cmake -DTFCELLS_SANITIZE=ON -DTFCELLS_BUILD_CORE_TESTS=ON).
//
// For every cell, layout, mask and shape (edge cases included) it checks, in double precision:
//  - inference and training forward passes agree;
//  - the full backward pass matches central finite differences of a weighted-sum loss;
//  - every gradient mask produces exactly the requested gradients, bit-identical to the full
//    pass, and never writes to the buffers of the others;
//  - with a thread-pool runner (batch shards, split GEMMs and loops) the results match the
//    sequential ones;
//  - a buffer smaller than the call plan asks for is refused before anything runs;
// and all of it once per ISA level of the kernels that this machine runs (argv[1]: one level).
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/cpu_rnn.h"

namespace tfcells {
namespace {

using Vec = std::vector<double>;

int failures = 0;

void Expect(bool ok, const char* what, const char* cell, int line) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAILED (%s, line %d): %s\n", cell, line, what);
  }
}
#define EXPECT(cond, cell) Expect((cond), #cond, (cell), __LINE__)

struct Case {
  CellKind cell;
  const char* name;
  Dims d;
  bool bias, mask;
  bool dropout = false;  // per-gate input and recurrent dropout masks
};

struct Problem {
  Case c;
  Vec x, h0, c0, kernel, recurrent_kernel, bias, w_y, w_h, w_c;
  Vec input_dropout, recurrent_dropout;  // [G, B, I], [G, B, H]: 0 or 1.5, like Keras' masks
  std::vector<char> mask;  // bool storage
  CpuOptions options;      // sequential unless a test sets a runner

  explicit Problem(const Case& cs, unsigned seed) : c(cs) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> n(0.0, 0.5);
    const Dims& d = c.d;
    const Index G = Info(c.cell).gates;
    auto fill = [&](Vec& v, Index size) {
      v.resize(size);
      for (double& e : v) e = n(rng);
    };
    fill(x, d.T * d.B * d.I);
    fill(h0, d.B * d.H);
    fill(c0, d.B * d.H);
    fill(kernel, d.I * G * d.H);
    fill(recurrent_kernel, d.H * G * d.H);
    fill(bias, c.bias ? (c.cell == CellKind::kGruResetAfter ? 2 : 1) * G * d.H : 0);
    fill(w_y, d.T * d.B * d.H);
    fill(w_h, d.B * d.H);
    fill(w_c, d.B * d.H);
    mask.resize(c.mask ? d.T * d.B : 0);
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = (rng() % 3) != 0;
    for (Vec* m : {&input_dropout, &recurrent_dropout}) {
      m->resize(c.dropout ? G * d.B * (m == &input_dropout ? d.I : d.H) : 0);
      for (double& e : *m) e = (rng() % 3) != 0 ? 1.5 : 0.0;
    }
  }

  // The call plan of a forward (training or not) or backward pass of this problem.
  CallPlan Plan(bool training, int grad_mask = kGradAll) const {
    const Dims& d = c.d;
    CallOptions o;
    o.cell = c.cell;
    o.time_major = d.time_major;
    o.go_backwards = d.go_backwards;
    o.has_bias = c.bias, o.has_mask = c.mask;
    o.has_input_dropout = o.has_recurrent_dropout = c.dropout;
    o.training = training;
    o.grad_mask = grad_mask;
    CallPlan plan;
    const std::string error = CallPlan::Make(o, CallPlan::ShapesFor(o, d), &plan);
    if (!error.empty()) throw std::logic_error("self-test plan: " + error);
    return plan;
  }

  InputPointers<double> Inputs() const {
    InputPointers<double> in;
    in.x = x.data(), in.h0 = h0.data(), in.c0 = c0.data(), in.kernel = kernel.data();
    in.recurrent_kernel = recurrent_kernel.data(), in.bias = c.bias ? bias.data() : nullptr;
    in.mask = c.mask ? reinterpret_cast<const bool*>(mask.data()) : nullptr;
    in.input_dropout = c.dropout ? input_dropout.data() : nullptr;
    in.recurrent_dropout = c.dropout ? recurrent_dropout.data() : nullptr;
    return in;
  }

  struct Result {
    Vec y, h_last, c_last, gates, aux, h_prev;
  };

  // workspace_short: hand the pass one element less workspace than its plan asks for.
  Result Forward(bool training, bool workspace_short = false) const {
    const Dims& d = c.d;
    const CallPlan plan = Plan(training);
    Result r;
    r.y.assign(d.T * d.B * d.H, 0.0);
    r.h_last.assign(d.B * d.H, 0.0);
    r.c_last.assign(d.B * d.H, 0.0);
    const CacheSizes cs = plan.Cache();
    r.gates.assign(cs.gates, 0.0);
    r.aux.assign(cs.aux, 0.0);
    r.h_prev.assign(cs.h_prev, 0.0);
    // Exactly the plan's size, NaN-filled: an overrun is a sanitizer report, a read of an
    // unwritten element a NaN in the results.
    Vec workspace(plan.forward_layout().total - (workspace_short ? 1 : 0),
                  std::numeric_limits<double>::quiet_NaN());
    ForwardArgs<double> a;
    a.plan = &plan;
    a.in = Inputs();
    a.y = r.y.data(), a.h_last = r.h_last.data(), a.c_last = r.c_last.data();
    a.gates = {r.gates.data(), cs.gates}, a.aux = {r.aux.data(), cs.aux};
    a.h_prev = {r.h_prev.data(), cs.h_prev};
    a.workspace = {workspace.data(), Index(workspace.size())};
    ForwardCpu(a, options);
    return r;
  }

  double Loss() const {
    const Result r = Forward(false);
    double loss = 0;
    for (size_t i = 0; i < r.y.size(); ++i) loss += r.y[i] * w_y[i];
    for (size_t i = 0; i < r.h_last.size(); ++i) loss += r.h_last[i] * w_h[i];
    if (c.cell == CellKind::kLstm)
      for (size_t i = 0; i < r.c_last.size(); ++i) loss += r.c_last[i] * w_c[i];
    return loss;
  }

  // Gradients for `grad_mask`; buffers of gradients not asked for are filled with NaN
  // beforehand (and passed anyway) so that a stray write would show.
  std::vector<Vec> Backward(const Result& fwd, int grad_mask, bool workspace_short = false) const {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const CallPlan plan = Plan(true, grad_mask);
    std::vector<Vec> g = {Vec(x.size(), nan), Vec(h0.size(), nan), Vec(c0.size(), nan),
                          Vec(kernel.size(), nan), Vec(recurrent_kernel.size(), nan),
                          Vec(bias.size(), nan)};
    Vec workspace(plan.backward_layout().total - (workspace_short ? 1 : 0), nan);
    BackwardArgs<double> a;
    a.plan = &plan;
    a.in = Inputs();
    a.gates = {fwd.gates.data(), Index(fwd.gates.size())};
    a.aux = {fwd.aux.data(), Index(fwd.aux.size())};
    a.h_prev = {fwd.h_prev.data(), Index(fwd.h_prev.size())};
    a.dy = w_y.data(), a.dh_last = w_h.data();
    a.dc_last = c.cell == CellKind::kLstm ? w_c.data() : nullptr;
    a.dx = g[0].data(), a.dh0 = g[1].data(), a.dc0 = g[2].data(), a.dkernel = g[3].data();
    a.drecurrent_kernel = g[4].data(), a.dbias = g[5].data();
    a.workspace = {workspace.data(), Index(workspace.size())};
    BackwardCpu(a, options);
    return g;
  }
};

const int kBits[6] = {kGradX, kGradH0, kGradC0, kGradKernel, kGradRecurrentKernel, kGradBias};

void Run(const Case& cs, unsigned seed) {
  Problem p(cs, seed);
  const Problem::Result inference = p.Forward(false), training = p.Forward(true);
  EXPECT(inference.y == training.y, cs.name);
  EXPECT(inference.h_last == training.h_last, cs.name);
  const bool lstm = cs.cell == CellKind::kLstm;
  if (lstm) EXPECT(inference.c_last == training.c_last, cs.name);

  int all = kGradAll;
  if (!lstm) all &= ~kGradC0;
  if (!cs.bias) all &= ~kGradBias;
  const std::vector<Vec> full = p.Backward(training, all);

  // A workspace one element short of the plan is refused, forward and backward.
  if (p.Plan(true).forward_layout().total > 0) {
    bool refused = false;
    try {
      p.Forward(true, true);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    EXPECT(refused, cs.name);
  }
  if (p.Plan(true, all).backward_layout().total > 0) {
    bool refused = false;
    try {
      p.Backward(training, all, true);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    EXPECT(refused, cs.name);
  }

  // Finite differences of every input element that has a gradient.
  std::vector<Vec*> params = {&p.x, &p.h0, &p.c0, &p.kernel, &p.recurrent_kernel, &p.bias};
  for (int k = 0; k < 6; ++k) {
    if (!(all & kBits[k])) continue;
    Vec& v = *params[k];
    for (size_t i = 0; i < v.size(); ++i) {
      const double saved = v[i], eps = 1e-6;
      v[i] = saved + eps;
      const double up = p.Loss();
      v[i] = saved - eps;
      const double down = p.Loss();
      v[i] = saved;
      const double numeric = (up - down) / (2 * eps);
      const double err = std::fabs(numeric - full[k][i]);
      if (!(err <= 1e-6 * (1 + std::fabs(numeric)))) {
        std::fprintf(stderr, "  %s: gradient %d[%zu] = %.10g, finite differences %.10g\n",
                     cs.name, k, i, full[k][i], numeric);
        EXPECT(false, cs.name);
        break;
      }
    }
  }

  // Every subset of the gradients: exactly those, bit-identical, nothing else written.
  for (int m = 0; m <= kGradAll; ++m) {
    if ((m & all) != m) continue;
    const std::vector<Vec> g = p.Backward(training, m);
    for (int k = 0; k < 6; ++k) {
      if (m & kBits[k]) {
        EXPECT(g[k] == full[k], cs.name);
      } else {
        bool untouched = true;
        for (double e : g[k]) untouched = untouched && std::isnan(e);
        EXPECT(untouched, cs.name);
      }
    }
  }
}

// Each task on its own thread: enough to exercise every parallel path of the CPU backend.
const ParallelRunner kThreads = [](int tasks, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int i = 1; i < tasks; ++i) threads.emplace_back(fn, i);
  fn(0);
  for (std::thread& t : threads) t.join();
};

bool Close(const Vec& a, const Vec& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= 1e-12 * (1 + std::fabs(b[i])))) return false;
  return true;
}

// Shapes large enough for batch shards (many rows, small steps) and for split GEMMs and
// pointwise loops (large steps).
void RunParallel(const Case& cs, unsigned seed, int max_tasks) {
  Problem p(cs, seed);
  const Problem::Result seq_fwd = p.Forward(true);
  int all = kGradAll;
  if (cs.cell != CellKind::kLstm) all &= ~kGradC0;
  if (!cs.bias) all &= ~kGradBias;
  const std::vector<Vec> seq = p.Backward(seq_fwd, all);
  p.options.runner = &kThreads;
  p.options.max_tasks = max_tasks;
  const Problem::Result par_fwd = p.Forward(true);
  EXPECT(Close(par_fwd.y, seq_fwd.y), cs.name);
  EXPECT(Close(par_fwd.h_last, seq_fwd.h_last), cs.name);
  EXPECT(Close(par_fwd.gates, seq_fwd.gates), cs.name);
  const std::vector<Vec> par = p.Backward(par_fwd, all);
  for (int k = 0; k < 6; ++k)
    if (all & kBits[k]) EXPECT(Close(par[k], seq[k]), cs.name);
}

}  // namespace
}  // namespace tfcells

int main(int argc, char** argv) {
  using namespace tfcells;
  const struct {
    CellKind cell;
    const char* name;
  } cells[] = {{CellKind::kLstm, "lstm"},
               {CellKind::kGruResetAfter, "gru"},
               {CellKind::kGruResetBefore, "gru_reset_before"},
               {CellKind::kSimpleRnn, "simple_rnn"}};
  // The last shape takes the step GEMM past one row block (6 or 12 rows, by vector width)
  // and past one column panel, with remainders in both.
  const Index shapes[][4] = {{1, 1, 1, 1}, {3, 2, 4, 5}, {4, 3, 2, 3}, {0, 2, 3, 4},
                             {3, 0, 2, 3}, {3, 2, 4, 0}, {2, 3, 3, 1},
                             {2, 13, 3, 17}};  // T, B, I, H
  int cases = 0;
  // Every level of the build that this machine runs (the first argument: only that one).
  std::vector<std::string> levels = CpuIsasBuilt();
  if (argc > 1) levels = {argv[1]};
  int levels_run = 0;
  for (const std::string& level : levels) {
    try {
      SetCpuIsa(level);
    } catch (const std::invalid_argument& e) {
      std::printf("  level %s: skipped, %s\n", level.c_str(), e.what());
      continue;
    }
    EXPECT(CpuIsa() == level, "SetCpuIsa");
    ++levels_run;
    const int before = cases, failed = failures;
    unsigned seed = 1;
    for (const auto& c : cells)
      for (const auto& s : shapes)
        for (int layout = 0; layout < 4; ++layout)
          for (int flags = 0; flags < 8; ++flags) {
            Case cs{c.cell, c.name, {}, bool(flags & 1), bool(flags & 2), bool(flags & 4)};
            cs.d.T = s[0], cs.d.B = s[1], cs.d.I = s[2], cs.d.H = s[3];
            cs.d.time_major = layout & 1;
            cs.d.go_backwards = layout & 2;
            Run(cs, seed++);
            ++cases;
          }
    // T, B, I, H, tasks. The last: many more shards than a batch of 330 divides evenly into
    // (a machine with 40 threads), where equal-size blocks would leave the last ones empty.
    const Index parallel_shapes[][5] = {
        {5, 50, 3, 6, 3}, {3, 32, 5, 300, 3}, {2, 330, 3, 5, 40}};
    for (const auto& c : cells)
      for (const auto& s : parallel_shapes)
        for (int layout = 0; layout < 4; ++layout) {
          Case cs{c.cell, c.name, {}, true, layout < 2, layout == 1 || layout == 2};
          cs.d.T = s[0], cs.d.B = s[1], cs.d.I = s[2], cs.d.H = s[3];
          cs.d.time_major = layout & 1;
          cs.d.go_backwards = layout & 2;
          RunParallel(cs, seed++, static_cast<int>(s[4]));
          ++cases;
        }
    std::printf("  level %s: %d cases, %d failures\n", level.c_str(), cases - before,
                failures - failed);
  }
  EXPECT(levels_run > 0, "no level ran");
  // A level that does not exist is refused with the valid choices.
  try {
    SetCpuIsa("x86-64-v9");
    EXPECT(false, "SetCpuIsa(x86-64-v9) accepted");
  } catch (const std::invalid_argument& e) {
    EXPECT(std::string(e.what()).find("valid choices: ") != std::string::npos, "level error");
  }
  // Shapes whose GEMMs would overflow the BLAS' 32-bit sizes are refused before any buffer
  // exists (only shapes are passed here).
  {
    CallOptions o;
    o.has_bias = false;
    CallPlan plan;
    const std::string error = CallPlan::Make(
        o, {{1 << 20, 1 << 12, 8}, {1 << 20, 4}, {1 << 20, 4}, {8, 16}, {4, 16}}, &plan);
    EXPECT(error.find("too large") != std::string::npos, "huge shapes");
    EXPECT(CallPlan::Make(o, {{2, 3, 8}, {2, 4}, {2, 4}, {8, 16}, {4, 16}}, &plan).empty(),
           "small shapes");
    ++cases;
  }
  // A cache of another plan's size is refused (the backward pass would read past it).
  {
    Case cs{CellKind::kLstm, "lstm", {}, true, false};
    cs.d.T = 3, cs.d.B = 2, cs.d.I = 2, cs.d.H = 3;
    Problem p(cs, 12345);
    Problem::Result fwd = p.Forward(true);
    fwd.gates.pop_back();
    bool refused = false;
    try {
      p.Backward(fwd, kGradAll);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    EXPECT(refused, "short cache");
    // An optional input the plan was made without has no scratch in its workspace: refused.
    Problem with_dropout({CellKind::kLstm, "lstm", cs.d, true, false, true}, 54321);
    Problem::Result out = p.Forward(false);
    ForwardArgs<double> a;
    const CallPlan plan = p.Plan(false);
    Vec workspace(plan.forward_layout().total);
    a.plan = &plan;
    a.in = with_dropout.Inputs();
    a.y = out.y.data(), a.h_last = out.h_last.data(), a.c_last = out.c_last.data();
    a.workspace = {workspace.data(), Index(workspace.size())};
    refused = false;
    try {
      ForwardCpu(a);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    EXPECT(refused, "unplanned dropout mask");
    ++cases;
  }
  std::printf("core self-test: %d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
