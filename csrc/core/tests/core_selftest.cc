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
//  - with 16-bit storage (bfloat16, float16) every output and state gradient is the float32
//    pass's, rounded, and every weight gradient the float32 pass's exactly; with bfloat16
//    pair products they stay within 3e-2 of it, and the pair step GEMM matches a scalar
//    reference bit for bit; the conversions round to nearest even (checked against exhaustive
//    and independent references);
// and all of it once per ISA level of the kernels that this machine runs (argv[1]: one level).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "../cpu/cpu_backend.h"
#include "../cpu/cpu_rnn.h"
#include "../cpu/step_gemm.h"

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
  Index projection_steps = 1;  // CallOptions::projection_steps

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
    o.projection_steps = projection_steps;
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

  // workspace_short: hand the pass one element less workspace than its plan asks for;
  // grad_mask: the gradients its backward pass may be asked for (what the cache keeps).
  Result Forward(bool training, bool workspace_short = false, int grad_mask = kGradAll) const {
    const Dims& d = c.d;
    const CallPlan plan = Plan(training, grad_mask);
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
    a.y = fwd.y.empty() ? nullptr : fwd.y.data();
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

// Bit-identical gradients, the ones not asked for (NaN: untouched) included.
bool Same(const std::vector<Vec>& a, const std::vector<Vec>& b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k].size() != b[k].size()) return false;
    for (size_t i = 0; i < a[k].size(); ++i)
      if (!(a[k][i] == b[k][i] || (std::isnan(a[k][i]) && std::isnan(b[k][i])))) return false;
  }
  return true;
}

// Input k's gradient `grad` against finite differences of the loss, at every stride-th element.
void CheckFiniteDifferences(Problem& p, int k, const Vec& grad, size_t stride, const char* name) {
  Vec* const params[] = {&p.x, &p.h0, &p.c0, &p.kernel, &p.recurrent_kernel, &p.bias};
  Vec& v = *params[k];
  // The difference of two losses carries their rounding divided by 2·eps. A loss over many rows
  // (thousands) rounds at up to 1e-14 of itself (measured: a GRU's loss of 146 over 1170 rows,
  // whose differences at eps = 1e-6 were 1.2e-6 off while those at 1e-4 agreed to 5e-9), so an
  // element the step of 1e-6 cannot confirm is checked again with a step of 1e-4, where the
  // rounding is 100 times smaller and the truncation (eps² times the third derivative) still
  // far below the 1e-6 of the check. A wrong gradient fails both.
  const double rounding = 1e-9 * std::fabs(p.Loss());
  for (size_t i = 0; i < v.size(); i += stride) {
    const double saved = v[i];
    double numeric = 0;
    bool agrees = false;
    for (double eps : {1e-6, 1e-4}) {
      v[i] = saved + eps;
      const double up = p.Loss();
      v[i] = saved - eps;
      const double down = p.Loss();
      v[i] = saved;
      numeric = (up - down) / (2 * eps);
      agrees = std::fabs(numeric - grad[i]) <= 1e-6 * (1 + std::fabs(numeric)) + rounding;
      if (agrees) break;
    }
    if (!agrees) {
      std::fprintf(stderr, "  %s: gradient %d[%zu] = %.10g, finite differences %.10g\n", name,
                   k, i, grad[i], numeric);
      EXPECT(false, name);
      return;
    }
  }
}

// Whether f() throws std::invalid_argument (the core's refusal of a call).
template <typename F>
bool Refused(const F& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

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
  if (p.Plan(true).forward_layout().total > 0)
    EXPECT(Refused([&] { p.Forward(true, true); }), cs.name);
  if (p.Plan(true, all).backward_layout().total > 0)
    EXPECT(Refused([&] { p.Backward(training, all, true); }), cs.name);

  // Finite differences of every input element that has a gradient.
  for (int k = 0; k < 6; ++k)
    if (all & kBits[k]) CheckFiniteDifferences(p, k, full[k], 1, cs.name);

  // The products by W_x of two steps at a time (the last chunk partial for odd T) are the same
  // products, run earlier (x_t·W_x) or later (dx_t): bit-identical results, also for dx alone
  // (its gate gradients then rotate through three slots).
  {
    Problem chunked = p;
    chunked.projection_steps = 2;
    chunked.options.l2_cache_bytes = 1;  // (CpuBackend::ProjectionSteps: weights "outgrow" L2)
    const Problem::Result inf2 = chunked.Forward(false), tr2 = chunked.Forward(true);
    EXPECT(inf2.y == inference.y && inf2.h_last == inference.h_last, cs.name);
    EXPECT(tr2.y == training.y && tr2.gates == training.gates, cs.name);
    EXPECT(Same(chunked.Backward(tr2, all), full), cs.name);
    const int dx_only = kGradX | kGradH0;
    EXPECT(Same(chunked.Backward(tr2, dx_only), p.Backward(training, dx_only)), cs.name);
  }

  // Every block of A's rows copied before its step products (RowCopies::kAlways; a CPU with
  // few L1 ways copies those whose stride would share L1 sets) and none copied: the same sums,
  // bit-identical.
  for (RowCopies copies : {RowCopies::kAlways, RowCopies::kNever}) {
    Problem copied = p;
    copied.options.row_copies = copies;
    const Problem::Result inf2 = copied.Forward(false), tr2 = copied.Forward(true);
    EXPECT(inf2.y == inference.y && inf2.h_last == inference.h_last, cs.name);
    EXPECT(tr2.y == training.y && tr2.gates == training.gates, cs.name);
    EXPECT(Same(copied.Backward(tr2, all), full), cs.name);
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

  // The backward pass reads the states entering each step from y a step behind, and the
  // forward keeps no copy of them, but for go_backwards (whose y is reversed); the finite
  // differences above check both ways.
  const size_t states = size_t(cs.d.Rows() * cs.d.H);
  EXPECT(training.h_prev.size() == (cs.d.go_backwards ? states : 0), cs.name);
  // There, a forward call whose backward may not be asked for dW_h keeps no h_prev cache,
  // unless the cell's backward pointwise step reads it (the GRUs); the gradients are the same.
  for (int m : {all & ~kGradRecurrentKernel, all & (kGradX | kGradH0)}) {
    const Problem::Result lean = p.Forward(true, false, m);
    const bool read = Info(cs.cell).pointwise_reads_h_prev;
    EXPECT(lean.h_prev.size() == (read ? training.h_prev.size() : 0), cs.name);
    EXPECT(lean.y == training.y && lean.gates == training.gates, cs.name);
    EXPECT(Same(p.Backward(lean, m), p.Backward(training, m)), cs.name);
  }
  // A backward pass that needs y refuses to run without it.
  if (p.Plan(true, all).NeedsY() && cs.d.Rows() * cs.d.H > 0) {
    Problem::Result no_y = training;
    no_y.y.clear();
    EXPECT(Refused([&] { p.Backward(no_y, all); }), cs.name);
  }
}

// The weight gradients alone, against finite differences at a sample of their elements (every
// element of a weight gradient sums over all rows): for shapes with too many rows to difference
// every input.
void RunWeightGradients(const Case& cs, unsigned seed) {
  Problem p(cs, seed);
  const int m = kGradKernel | kGradRecurrentKernel;
  const std::vector<Vec> grads = p.Backward(p.Forward(true), m);
  for (int k = 0; k < 6; ++k)
    if (m & kBits[k]) CheckFiniteDifferences(p, k, grads[k], grads[k].size() / 32 + 1, cs.name);
}

// Each task on its own thread: enough to exercise every parallel path of the CPU backend.
const ParallelRunner kThreads = [](int tasks, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int i = 1; i < tasks; ++i) threads.emplace_back(fn, i);
  fn(0);
  for (std::thread& t : threads) t.join();
};

// The tasks one after another on the calling thread (a pool with no thread free), and each task
// but the first starting late: a time loop split by units must take over the parts whose task
// has not started (StepParts), and a late task must join where the loop has got to.
const ParallelRunner kOneThread = [](int tasks, const std::function<void(int)>& fn) {
  for (int i = 0; i < tasks; ++i) fn(i);
};
const ParallelRunner kLateThreads = [](int tasks, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int i = 1; i < tasks; ++i)
    threads.emplace_back([&fn, i] {
      std::this_thread::sleep_for(std::chrono::microseconds(300 * i));
      fn(i);
    });
  fn(0);
  for (std::thread& t : threads) t.join();
};

#if defined(__linux__)
bool SameAffinity(const cpu_set_t& a) {
  cpu_set_t now;
  return sched_getaffinity(0, sizeof(now), &now) == 0 && CPU_EQUAL(&a, &now);
}
#endif

// ShardCpus: as many tasks as CPUs this process may use each hold one of their own, running on
// it while pinned; one task more finds none free and runs unpinned; every thread's affinity mask
// is as before afterwards.
void CheckShardCpus() {
#if defined(__linux__)
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0 ||
      sched_setaffinity(0, sizeof(mask), &mask) != 0) {
    std::printf("  ShardCpus: skipped, this process may not set its affinity\n");
    return;
  }
  const int allowed = CPU_COUNT(&mask);
  for (int extra : {0, 1}) {
    const int tasks = allowed + extra;
    std::vector<int> cpu(tasks, -1), ran_on(tasks, -1);
    std::vector<char> restored(tasks, 0);
    ShardCpus cpus;
    kThreads(tasks, [&](int i) {
      cpu_set_t before;
      sched_getaffinity(0, sizeof(before), &before);
      {
        const ShardCpus::Pin pin(cpus, true);
        cpu[i] = pin.cpu();
        ran_on[i] = sched_getcpu();
      }
      restored[i] = SameAffinity(before);
    });
    std::vector<int> pinned;
    for (int i = 0; i < tasks; ++i) {
      EXPECT(restored[i], "ShardCpus");
      if (cpu[i] < 0) continue;
      EXPECT(ran_on[i] == cpu[i] && CPU_ISSET(cpu[i], &mask), "ShardCpus");
      pinned.push_back(cpu[i]);
    }
    std::sort(pinned.begin(), pinned.end());
    EXPECT(int(pinned.size()) == allowed, "ShardCpus");
    EXPECT(std::adjacent_find(pinned.begin(), pinned.end()) == pinned.end(), "ShardCpus");
  }
  ShardCpus cpus;
  const ShardCpus::Pin off(cpus, false);
  EXPECT(off.cpu() == -1 && SameAffinity(mask), "ShardCpus");
#endif
}

bool Close(const Vec& a, const Vec& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= 1e-12 * (1 + std::fabs(b[i])))) return false;
  return true;
}

// Shapes large enough for batch shards (many rows, small steps) and for split GEMMs and
// pointwise loops (large steps).
void RunParallel(const Case& cs, unsigned seed, int max_tasks,
                 const ParallelRunner* runner = &kThreads) {
  Problem p(cs, seed);
  const Problem::Result seq_fwd = p.Forward(true);
  int all = kGradAll;
  if (cs.cell != CellKind::kLstm) all &= ~kGradC0;
  if (!cs.bias) all &= ~kGradBias;
  const std::vector<Vec> seq = p.Backward(seq_fwd, all);
  p.options.runner = runner;
  p.options.max_tasks = max_tasks;
  p.options.split_units = true;  // units split wherever the cell and shape allow
  p.options.l2_cache_bytes = 1;
  p.options.min_parallel_elements = 1;  // every pointwise loop and column sum split too
  p.projection_steps = 2;  // x_t·W_x ahead and dx_t behind, shared between shards and parts
  p.options.row_copies = seed % 2 ? RowCopies::kAlways : RowCopies::kNever;  // both, in turn
#if defined(__linux__)
  cpu_set_t mask;  // the calling thread's, restored after each loop (ShardCpus)
  const bool have_mask = sched_getaffinity(0, sizeof(mask), &mask) == 0;
#endif
  const Problem::Result par_fwd = p.Forward(true);
  EXPECT(Close(par_fwd.y, seq_fwd.y), cs.name);
  EXPECT(Close(par_fwd.h_last, seq_fwd.h_last), cs.name);
  EXPECT(Close(par_fwd.gates, seq_fwd.gates), cs.name);
  EXPECT(Close(p.Forward(false).y, seq_fwd.y), cs.name);
  const std::vector<Vec> par = p.Backward(par_fwd, all);
  for (int k = 0; k < 6; ++k)
    if (all & kBits[k]) EXPECT(Close(par[k], seq[k]), cs.name);
  // dx alone: the gate gradients in rotating slots, each reused once every shard has done with
  // it.
  if (all & kGradX) EXPECT(Close(p.Backward(par_fwd, kGradX)[0], seq[0]), cs.name);
#if defined(__linux__)
  EXPECT(!have_mask || SameAffinity(mask), cs.name);
#endif
}

}  // namespace
}  // namespace tfcells

namespace tfcells {
namespace {

// The same call in float32 on widened inputs, and with storage S: outputs and state gradients
// must be the float32 ones rounded, weight gradients identical.
//
// products = kBFloat16 (bfloat16 storage only): the step products multiply bfloat16 pairs, so
// the results are no longer the float32 pass's: every value must stay within 3e-2 of it, as a
// fraction of the largest magnitude or of 0.1 (the inputs' scale: a gradient that cancels to
// near zero keeps the absolute rounding error of its terms).
template <typename S>
void RunStaged(const Case& cs, unsigned seed,
               StepProducts products = StepProducts::kFloat32) {
  const Problem p(cs, seed);
  const Dims& d = cs.d;
  auto narrow = [](const Vec& v) {
    std::vector<S> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = FromFloat<S>(float(v[i]));
    return out;
  };
  auto widen = [](const std::vector<S>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = ToFloat(v[i]);
    return out;
  };
  auto as_float = [](const Vec& v) { return std::vector<float>(v.begin(), v.end()); };
  const std::vector<S> xs = narrow(p.x), h0s = narrow(p.h0), c0s = narrow(p.c0);
  const std::vector<S> dys = narrow(p.w_y), dhs = narrow(p.w_h), dcs = narrow(p.w_c);
  const std::vector<float> kernel = as_float(p.kernel), rk = as_float(p.recurrent_kernel),
                           bias = as_float(p.bias), in_drop = as_float(p.input_dropout),
                           rec_drop = as_float(p.recurrent_dropout);
  const bool lstm = cs.cell == CellKind::kLstm;
  const Index seq = d.T * d.B * d.H, state = d.B * d.H;

  // One forward (training) and backward pass with storage U.
  struct Out {
    std::vector<float> cache[3], dweights[3];
    std::vector<char> y, h, c, dx, dh0, dc0;  // raw bytes of storage-typed results
  };
  auto run = [&](auto tag, const auto& x, const auto& h0, const auto& c0, const auto& dy,
                 const auto& dh, const auto& dc) {
    using U = decltype(tag);
    CallPlan fplan = p.Plan(true), bplan = p.Plan(true, kGradAll);
    if constexpr (!std::is_same_v<U, float>) {
      CallOptions o = fplan.options();
      o.storage = std::is_same_v<U, bfloat16> ? Storage::kBFloat16 : Storage::kFloat16;
      CallPlan::Make(o, CallPlan::ShapesFor(o, d), &fplan);
      o.grad_mask = kGradAll;
      CallPlan::Make(o, CallPlan::ShapesFor(o, d), &bplan);
    }
    std::vector<U> y(seq), h(state), c(state), dx(x.size()), dh0(state), dc0(state);
    const CacheSizes cache = fplan.Cache();
    Out out;
    out.cache[0].resize(cache.gates), out.cache[1].resize(cache.aux);
    out.cache[2].resize(cache.h_prev);
    out.dweights[0].resize(kernel.size()), out.dweights[1].resize(rk.size());
    out.dweights[2].resize(bias.size());
    InputPointers<float, U> in;
    in.x = x.data(), in.h0 = h0.data(), in.c0 = c0.data(), in.kernel = kernel.data();
    in.recurrent_kernel = rk.data(), in.bias = cs.bias ? bias.data() : nullptr;
    in.mask = cs.mask ? reinterpret_cast<const bool*>(p.mask.data()) : nullptr;
    in.input_dropout = cs.dropout ? in_drop.data() : nullptr;
    in.recurrent_dropout = cs.dropout ? rec_drop.data() : nullptr;
    CpuOptions options;
    options.products = std::is_same_v<U, float> ? StepProducts::kFloat32 : products;
    std::vector<float> fws(fplan.forward_layout().total, std::nanf(""));
    ForwardArgs<float, U> f;
    f.plan = &fplan, f.in = in, f.y = y.data(), f.h_last = h.data(), f.c_last = c.data();
    f.gates = {out.cache[0].data(), cache.gates}, f.aux = {out.cache[1].data(), cache.aux};
    f.h_prev = {out.cache[2].data(), cache.h_prev};
    f.workspace = {fws.data(), Index(fws.size())};
    ForwardCpu(f, options);
    std::vector<float> bws(bplan.backward_layout().total, std::nanf(""));
    BackwardArgs<float, U> b;
    b.plan = &bplan, b.in = in;
    b.gates = {out.cache[0].data(), cache.gates}, b.aux = {out.cache[1].data(), cache.aux};
    b.h_prev = {out.cache[2].data(), cache.h_prev};
    b.y = y.data();
    b.dy = dy.data(), b.dh_last = dh.data(), b.dc_last = lstm ? dc.data() : nullptr;
    b.dx = dx.data(), b.dh0 = dh0.data(), b.dc0 = dc0.data();
    b.dkernel = out.dweights[0].data(), b.drecurrent_kernel = out.dweights[1].data();
    b.dbias = out.dweights[2].data();
    b.workspace = {bws.data(), Index(bws.size())};
    BackwardCpu(b, options);
    auto bytes = [&](const std::vector<U>& v) {  // rounded to S when U is float
      std::vector<S> r(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        if constexpr (std::is_same_v<U, float>) r[i] = FromFloat<S>(v[i]);
        else r[i] = v[i];
      }
      const char* raw = reinterpret_cast<const char*>(r.data());
      return std::vector<char>(raw, raw + r.size() * sizeof(S));
    };
    out.y = bytes(y), out.h = bytes(h), out.c = bytes(c);
    out.dx = bytes(dx), out.dh0 = bytes(dh0), out.dc0 = bytes(dc0);
    return out;
  };
  const Out ref = run(0.0f, widen(xs), widen(h0s), widen(c0s), widen(dys), widen(dhs),
                      widen(dcs));
  const Out got = run(S{}, xs, h0s, c0s, dys, dhs, dcs);
  // a within `rel` of b's largest magnitude (at least `floor`).
  auto near = [](const std::vector<float>& a, const std::vector<float>& b, double rel,
                 double floor) {
    double scale = floor, err = 0;
    for (size_t i = 0; i < b.size(); ++i) scale = std::max(scale, double(std::fabs(b[i])));
    for (size_t i = 0; i < b.size(); ++i) err = std::max(err, double(std::fabs(a[i] - b[i])));
    return a.size() == b.size() && err <= rel * scale;
  };
  if (products == StepProducts::kBFloat16) {
    auto values = [](const std::vector<char>& bytes) {
      std::vector<float> v(bytes.size() / sizeof(S));
      for (size_t i = 0; i < v.size(); ++i) {
        S e;
        std::memcpy(&e, bytes.data() + i * sizeof(S), sizeof(S));
        v[i] = ToFloat(e);
      }
      return v;
    };
    // Operands rounded to bfloat16 (2^-9 each) err relative to the products' terms |a·w|,
    // about 1 with these inputs, not to the outputs: an output near 0 by cancellation (T = B =
    // I = H = 1) may be off by 4e-3. Hence a floor of 1.
    for (auto member : {&Out::y, &Out::h, &Out::c, &Out::dx, &Out::dh0, &Out::dc0})
      EXPECT(near(values(got.*member), values(ref.*member), 3e-2, 1.0), cs.name);
    for (int i = 0; i < 3; ++i)
      EXPECT(near(got.dweights[i], ref.dweights[i], 3e-2, 1.0), cs.name);
    return;
  }
  EXPECT(got.y == ref.y && got.h == ref.h && (!lstm || got.c == ref.c), cs.name);
  EXPECT(got.dx == ref.dx && got.dh0 == ref.dh0 && (!lstm || got.dc0 == ref.dc0), cs.name);
  // The float32 pass reads h_prev from y (CallPlan::HPrevFromY: no h_prev cache, dW_h as h0's
  // product plus y's a step behind), the staged pass from its cache in one GEMM: the same
  // products summed in another order, so dW_h agrees to float32 rounding there.
  const bool ref_from_y = ref.cache[2].empty() && !got.cache[2].empty();
  // Nor does it keep SimpleRNN's gates (CallPlan::GatesFromY: its backward reads them from y,
  // where the staged pass keeps them), and its gradients still match bit for bit.
  const bool gates_from_y = ref.cache[0].empty() && !got.cache[0].empty();
  for (int i = 0; i < 3; ++i) {
    const bool ref_keeps_none = i == 0 ? gates_from_y : i == 2 && ref_from_y;
    if (!ref_keeps_none) EXPECT(got.cache[i] == ref.cache[i], cs.name);
    if (i == 1 && ref_from_y) {
      EXPECT(near(got.dweights[1], ref.dweights[1], 1e-5, 1e-30), cs.name);
    } else {
      EXPECT(got.dweights[i] == ref.dweights[i], cs.name);
    }
  }
}

// start + Σ_kk round(a(kk))·round(b(kk)) over kk < k in float32, in a pair instruction's order:
// per pair of kk the low halves' product first (TDPBF16PS) or the high halves' (vdpbf16ps).
template <typename A, typename B>
float PairSum(Index k, const A& a, const B& b, bool low_first, float start = 0.0f) {
  auto round = [](float v) { return ToFloat(FromFloat<bfloat16>(v)); };
  float acc = start;
  for (Index kk = 0; kk < k; kk += 2) {
    const float lo = round(a(kk)) * round(b(kk));
    const float hi = kk + 1 < k ? round(a(kk + 1)) * round(b(kk + 1)) : 0.0f;
    acc += low_first ? lo : hi;
    acc += low_first ? hi : lo;
  }
  return acc;
}

// How many bfloat16 pair products of `multiply` differ from a scalar sum in the instruction's
// order: per pair the high halves' product first (vdpbf16ps, whose kernel adds βC last) or the
// low halves' (TDPBF16PS, whose accumulators start from βC: tiles).
// multiply(op, m, a, lda, beta, c, ldc) computes C = A·op + βC with a PackedOperand<float, ...>
// of pairs made by make(trans, k, cols, w, ld). Bit for bit: products of two bfloat16 are exact
// in float32, so only the order of the additions matters.
template <typename Make, typename Multiply>
int PairProductMismatches(std::initializer_list<Index> ms, std::initializer_list<Index> ks,
                          std::initializer_list<Index> colss, bool tiles, const Make& make,
                          const Multiply& multiply) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  int bad = 0;
  for (Index m : ms)
    for (Index k : ks)
      for (Index cols : colss)
        for (bool trans : {false, true})
          for (float beta : {0.0f, 1.0f, 0.5f}) {
            const Index lda = k + 3, ldc = cols + 2;  // strided rows, and C's gaps kept intact
            std::vector<float> a(m * lda), w(k * cols), c(m * ldc);
            for (float& e : a) e = n(rng);
            for (float& e : w) e = n(rng);
            for (float& e : c) e = n(rng);
            std::vector<float> want = c;
            auto w_at = [&](Index kk, Index j) { return trans ? w[j * k + kk] : w[kk * cols + j]; };
            for (Index i = 0; i < m; ++i)
              for (Index j = 0; j < cols; ++j) {
                const float bc = beta != 0.0f ? beta * c[i * ldc + j] : 0.0f;
                const float acc = PairSum(
                    k, [&](Index kk) { return a[i * lda + kk]; },
                    [&](Index kk) { return w_at(kk, j); }, tiles, tiles ? bc : 0.0f);
                want[i * ldc + j] = tiles ? acc : acc + bc;
              }
            const auto op = make(trans, k, cols, w.data(), trans ? k : cols);
            multiply(op, m, a.data(), lda, beta, c.data(), ldc);
            if (c != want) ++bad;
          }
  return bad;
}

// The step GEMM on bfloat16 pairs (the self-test's own compile of it: the packing, blocking
// and pair order every level shares; only the dot product differs, by an instruction defined
// to round the same) against vdpbf16ps' definition.
void CheckPairProducts() {
  const int bad = PairProductMismatches(
      {1, 5, 13, 30}, {1, 2, 7, 64}, {1, 17, 40, 100}, false,
      [](bool trans, Index k, Index cols, const float* w, Index ld) {
        return PackedOperand<float>(trans, k, cols, w, ld, true);
      },
      [](const PackedOperand<float>& op, Index m, const float* a, Index lda, float beta,
         float* c, Index ldc) { op.Multiply(m, a, lda, beta, c, ldc, 0, op.Panels()); });
  EXPECT(bad == 0, "bfloat16 pair products");
}

// The pair products' tile program (what the amx level runs on AMX tiles) on EmulatedTiles,
// TDPBF16PS' definition. m, k and the columns cross the 32-row blocks, 16-pair tiles and
// 32-column panels; each product runs as two calls on halves of the panels, as a split step.
void CheckTileProducts() {
  using Operand = TilePairOperand;
  const int bad = PairProductMismatches(
      {1, 5, 31, 32, 33, 70}, {1, 2, 31, 32, 33, 70}, {1, 16, 32, 45, 100}, true,
      [](bool trans, Index k, Index cols, const float* w, Index ld) {
        return Operand(trans, k, cols, w, ld, true);
      },
      [](const Operand& op, Index m, const float* a, Index lda, float beta, float* c,
         Index ldc) {
        const Index half = op.Panels() / 2;
        op.MultiplyPairTiles<step_gemm::EmulatedTiles>(m, a, lda, beta, c, ldc, 0, half);
        op.MultiplyPairTiles<step_gemm::EmulatedTiles>(m, a, lda, beta, c, ldc, half,
                                                       op.Panels());
      });
  EXPECT(bad == 0, "bfloat16 pair products on tiles");
}

// The whole-sequence GEMM on bfloat16 pairs (CpuBackend::PairGemm, the weight gradients of
// bfloat16 calls): on EmulatedTiles (the amx level's program) and on VectorPairs (the pair
// kernel's, the other levels'), every transposition, both packing choices (m < n packs op(A)ᵀ and
// writes C transposed), split across threads, bit for bit against the scalar sum in the
// instruction's order: TDPBF16PS' from βC on; vdpbf16ps' from zero per slab of k, C added last.
template <typename Tiles>
void CheckPairGemm() {
  constexpr bool kTiles = !std::is_same_v<Tiles, step_gemm::VectorPairs>;
  constexpr Index kSlab = 2 * TilePairOperand::kSlabPairs;  // k values per slab
  std::mt19937 rng(13);
  std::normal_distribution<float> n(0.0f, 1.0f);
  int bad = 0;
  // m, n, k; from {100, 70, 300} on large enough to be split (kMinParallelGemmFlops); the last
  // two run k in several slabs (MultiplyPairTilesInSlabs), one of them in whole 32 x 32 blocks.
  const Index shapes[][3] = {{1, 1, 1},       {5, 40, 33},     {40, 5, 33},
                             {70, 100, 7},    {100, 70, 300},  {70, 100, 301},
                             {40, 37, 1100},  {64, 64, 1025}};
  for (const auto& s : shapes)
    for (int trans = 0; trans < 4; ++trans)
      for (float beta : {0.0f, 1.0f, 0.5f})
        for (int tasks : {1, 3}) {
          const Index m = s[0], cols = s[1], k = s[2];
          const bool ta = trans & 1, tb = trans & 2;
          const Index lda = (ta ? m : k) + 1, ldb = (tb ? k : cols) + 2, ldc = cols + 3;
          std::vector<float> a((ta ? k : m) * lda), b((tb ? cols : k) * ldb), c(m * ldc);
          for (float& e : a) e = n(rng);
          for (float& e : b) e = n(rng);
          for (float& e : c) e = n(rng);
          auto a_at = [&](Index i, Index kk) { return ta ? a[kk * lda + i] : a[i * lda + kk]; };
          auto b_at = [&](Index kk, Index j) { return tb ? b[j * ldb + kk] : b[kk * ldb + j]; };
          std::vector<float> want = c;
          for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < cols; ++j) {
              const float bc = beta != 0.0f ? beta * c[i * ldc + j] : 0.0f;
              if (kTiles) {
                want[i * ldc + j] = PairSum(
                    k, [&](Index kk) { return a_at(i, kk); },
                    [&](Index kk) { return b_at(kk, j); }, true, bc);
                continue;
              }
              float sum = bc;
              for (Index k0 = 0; k0 < k; k0 += kSlab)
                sum = PairSum(
                          std::min(kSlab, k - k0), [&](Index kk) { return a_at(i, k0 + kk); },
                          [&](Index kk) { return b_at(k0 + kk, j); }, false) +
                      sum;
              want[i * ldc + j] = sum;
            }
          CpuBackend be;
          be.runner = tasks > 1 ? &kThreads : nullptr;
          be.max_tasks = tasks;
          be.PairGemm<Tiles>(ta, tb, m, cols, k, a.data(), lda, b.data(), ldb, beta, c.data(),
                             ldc);
          if (c != want) ++bad;
        }
  EXPECT(bad == 0, kTiles ? "bfloat16 whole-sequence GEMM on tiles"
                          : "bfloat16 whole-sequence GEMM on the pair kernel");
}

// The 16-bit conversions: every 16-bit value survives widening and rounding back; rounding
// floats agrees with independent references (the nearest of the two neighbours in double for
// bfloat16, the compiler's _Float16 for float16) on a stride through all 2^32 bit patterns and
// on the halfway points, where ties go to even.
void CheckConversions() {
  auto float_of = [](std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  int bad = 0;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const bfloat16 v{std::uint16_t(b)};
    const float16 h{std::uint16_t(b)};
    const float fv = ToFloat(v), fh = ToFloat(h);
    if (std::isnan(fv) ? !std::isnan(ToFloat(FromFloat<bfloat16>(fv)))
                       : FromFloat<bfloat16>(fv).bits != b)
      ++bad;
    if (std::isnan(fh) ? !std::isnan(ToFloat(FromFloat<float16>(fh)))
                       : FromFloat<float16>(fh).bits != b)
      ++bad;
    _Float16 ref;
    std::memcpy(&ref, &h.bits, 2);
    if (!std::isnan(fh) && float(ref) != fh) ++bad;  // widening: exact
  }
  EXPECT(bad == 0, "16-bit round trips");
  bad = 0;
  auto check = [&](std::uint32_t u) {
    const float f = float_of(u);
    // bfloat16: the two candidates around f (truncated, and one ulp further from zero).
    // Past the largest finite value the next candidate is infinity, at 2^128 for rounding.
    const std::uint16_t lo = std::uint16_t(u >> 16), hi = std::uint16_t(lo + 1);
    const double vh = (hi & 0x7FFF) == 0x7F80 ? std::copysign(std::ldexp(1.0, 128), f)
                                              : double(ToFloat(bfloat16{hi}));
    const double dl = std::fabs(double(ToFloat(bfloat16{lo})) - f), dh = std::fabs(vh - f);
    const std::uint16_t want = std::isnan(f) || std::isinf(f) ? lo
                               : (dl < dh || (dl == dh && (lo & 1) == 0)) ? lo
                                                                          : hi;
    const bfloat16 got = FromFloat<bfloat16>(f);
    if (std::isnan(f) ? !std::isnan(ToFloat(got)) : got.bits != want) ++bad;
    const _Float16 ref = _Float16(f);
    std::uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    const float16 h = FromFloat<float16>(f);
    if (std::isnan(f) ? !std::isnan(ToFloat(h)) : h.bits != ref_bits) ++bad;
  };
  for (std::uint64_t u = 0; u < (1ull << 32); u += 997) check(std::uint32_t(u));
  for (std::uint32_t b = 0; b < 0x10000; ++b) {  // halfway points of both types, and beside
    for (std::uint32_t tail : {0x8000u, 0x7FFFu, 0x8001u}) check((b << 16) | tail);
    const float16 h{std::uint16_t(b)};
    const float fh = ToFloat(h);
    std::uint32_t u;
    std::memcpy(&u, &fh, 4);
    for (std::uint32_t delta : {0x1000u, 0x0FFFu, 0x1001u}) check(u + delta);
  }
  EXPECT(bad == 0, "16-bit rounding");
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
  CheckShardCpus();  // first: a thread left pinned by a faulty run would make it vacuous
  int cases = 1;
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
    // T, B, I, H, tasks, each on threads, on one thread and with late starts. Batch shards
    // (the first three): the tasks that have started run the steps of the shards whose task has
    // not (ShardSteps); the third has many more shards than a batch of 330 divides evenly into
    // (a machine with 40 threads), where equal-size blocks would leave the last ones empty.
    // Time loops split by units (CpuBackend::ForShards: H a multiple of 32 and a step of at
    // least kMinUnitSplitStepFlops; the last two): H = 160 in three parts (64, 64, 32 units),
    // dx's I = 100 columns in three (32, 32, 36: the last panel partial), and H = 64 in two; a
    // task must take over the parts whose task has not started (StepParts).
    const Index parallel_shapes[][5] = {{5, 50, 3, 6, 3},      {3, 32, 5, 300, 3},
                                        {2, 330, 3, 5, 40},    {3, 16, 100, 160, 3},
                                        {4, 24, 300, 64, 2}};
    for (const auto& c : cells)
      for (const auto& s : parallel_shapes)
        for (const ParallelRunner* runner : {&kThreads, &kOneThread, &kLateThreads})
          for (int layout = 0; layout < 4; ++layout) {
            Case cs{c.cell, c.name, {}, true, layout < 2, layout == 1 || layout == 2};
            cs.d.T = s[0], cs.d.B = s[1], cs.d.I = s[2], cs.d.H = s[3];
            cs.d.time_major = layout & 1;
            cs.d.go_backwards = layout & 2;
            RunParallel(cs, seed++, static_cast<int>(s[4]), runner);
            ++cases;
          }
    // Dropout weight gradients over more rows than CpuBackend::MaskedGemms packs at a time
    // (kMaskedChunkRows = 128): chunks added up, the last one partial, H = 20 a partial panel;
    // summed whole where two parts' scratch would not fit (the LSTM's 1100 rows, I = 5), in
    // kMaskedRowParts parts elsewhere; with three tasks, C's rows split between them in blocks
    // of 12 (H = 48: 24 and 24; I = 48, H = 20: 24 and 24, 12 and 8), and on the calling thread
    // below kMinParallelGemmFlops. The small shapes of every other dropout case run the
    // fallback, MaskedGemmsByGate (scratch too small for a chunk).
    const Index chunked_shapes[][4] = {{11, 100, 5, 20}, {9, 130, 3, 48}, {23, 100, 48, 20}};
    for (const auto& c : cells)
      for (const auto& s : chunked_shapes)
        for (bool time_major : {false, true}) {
          Case cs{c.cell, c.name, {}, true, true, true};
          cs.d.T = s[0], cs.d.B = s[1], cs.d.I = s[2], cs.d.H = s[3];
          cs.d.time_major = time_major;
          RunWeightGradients(cs, seed++);
          RunParallel(cs, seed++, 3);
          cases += 2;
        }
    // 16-bit storage: every cell and layout, with all optional inputs and without, and the
    // empty shapes.
    for (const auto& c : cells)
      for (const auto& s : shapes)
        for (int layout = 0; layout < 4; ++layout)
          for (bool all : {false, true}) {
            Case cs{c.cell, c.name, {}, all, all, all};
            cs.d.T = s[0], cs.d.B = s[1], cs.d.I = s[2], cs.d.H = s[3];
            cs.d.time_major = layout & 1;
            cs.d.go_backwards = layout & 2;
            RunStaged<bfloat16>(cs, seed);
            RunStaged<bfloat16>(cs, seed, StepProducts::kBFloat16);
            RunStaged<float16>(cs, seed++);
            cases += 3;
          }
    std::printf("  level %s: %d cases, %d failures\n", level.c_str(), cases - before,
                failures - failed);
  }
  EXPECT(levels_run > 0, "no level ran");
  CheckConversions();
  CheckPairProducts();
  CheckTileProducts();
  CheckPairGemm<step_gemm::EmulatedTiles>();
  CheckPairGemm<step_gemm::VectorPairs>();
  cases += 4;
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
  // Projections of groups of steps: at most T of them, and for inference no more than 16 Mi
  // elements of slots (B = 1024, G·H = 4096: 4 steps), whatever the binding asks for.
  {
    CallOptions o;
    o.projection_steps = 8;
    Dims d;
    d.T = 5, d.B = 2, d.I = 3, d.H = 4;
    CallPlan plan;
    EXPECT(CallPlan::Make(o, CallPlan::ShapesFor(o, d), &plan).empty(), "plan");
    EXPECT(plan.options().projection_steps == 5, "projection_steps clamped to T");
    d.T = 100, d.B = 1024, d.H = 1024;
    o.training = false;
    EXPECT(CallPlan::Make(o, CallPlan::ShapesFor(o, d), &plan).empty(), "plan");
    EXPECT(plan.options().projection_steps == 4, "inference slots capped");
    EXPECT(plan.forward_layout().input_projection.size == Index(1) << 24, "slots' size");
    o.training = true;  // (training projects into its cache: no slots)
    EXPECT(CallPlan::Make(o, CallPlan::ShapesFor(o, d), &plan).empty(), "plan");
    EXPECT(plan.options().projection_steps == 8, "training uncapped");
    cases += 3;
  }
  // GRU reset_after carries its recurrent side's gate gradients, so its input side's get
  // workspace only where dx or dW_x reads them (db is summed in the pointwise pass); the other
  // cells carry dG itself and always have it.
  {
    Dims d;
    d.T = 6, d.B = 3, d.I = 4, d.H = 5;
    auto dgates = [&](CellKind cell, int grad_mask) {
      CallOptions o;
      o.cell = cell, o.grad_mask = grad_mask;
      CallPlan plan;
      EXPECT(CallPlan::Make(o, CallPlan::ShapesFor(o, d), &plan).empty(), "plan");
      return plan.backward_layout().dgates.size;
    };
    const int no_input_side = kGradH0 | kGradRecurrentKernel | kGradBias;
    EXPECT(dgates(CellKind::kGruResetAfter, no_input_side) == 0, "gru: no input side");
    // Per-step dx reads them a step at a time: slots, not every step's (dW_h reads dgates_rec).
    const Index every_step = d.T * d.B * 3 * d.H;
    EXPECT(dgates(CellKind::kGruResetAfter, no_input_side | kGradX) > 0, "gru: dx");
    EXPECT(dgates(CellKind::kGruResetAfter, no_input_side | kGradX) < every_step, "gru: slots");
    EXPECT(dgates(CellKind::kGruResetAfter, no_input_side | kGradKernel) == every_step,
           "gru: dW_x");
    for (CellKind cell : {CellKind::kLstm, CellKind::kGruResetBefore, CellKind::kSimpleRnn})
      EXPECT(dgates(cell, no_input_side) > 0, "carried dG");
    cases += 4;
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
