// Host-only check of the CUDA backend's GEMM mapping (gemm_mapping.h), runnable on machines
// without a GPU: the whole recurrence driver runs with plain row-major GEMMs and with every GEMM
// turned into the column-major call cuBLAS would receive, executed by a reference column-major
// GEMM that also enforces BLAS' leading-dimension rules (what cuBLAS answers with
// CUBLAS_STATUS_INVALID_VALUE). Both run the input projection and dx over all T*B rows, as the
// CUDA backend does; a third run does them a step at a time, as the CPU backend does, so the
// two driver paths are held to each other. Outputs must agree for every cell, layout, mask
// (dropout or not) and gradient mask. Built and run by tests/test_cuda.py:
//   g++ -std=c++17 -I csrc csrc/cuda/host_check.cc csrc/core/plan.cc -o host_check
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/rnn.h"
#include "gemm_mapping.h"

namespace tfcells {
namespace {

template <typename F>
void Loop(Index rows, Index cols, const F& f) {
  for (Index b = 0; b < rows; ++b)
    for (Index j = 0; j < cols; ++j) f(b, j);
}

template <typename Backend>  // the derived backend, handed to ForRowShards' callback
struct HostParts : InPlaceStepOperands<Backend> {
  // As the CUDA backend (kCudaInputProjection): the input projection and dx over all rows.
  static constexpr InputProjection kInputProjection = InputProjection::kWholeSequence;

  template <typename F>
  void ForEach(Index rows, Index cols, const F& f) {
    Loop(rows, cols, f);
  }
  template <typename T>
  void ColumnSum(Index rows, Index cols, const T* a, Index lda, T* out) {
    for (Index j = 0; j < cols; ++j) {
      T s = 0;
      for (Index r = 0; r < rows; ++r) s += a[r * lda + j];
      out[j] = s;
    }
  }
  const bool* TrueFlag() const {
    static const bool kTrue = true;
    return &kTrue;
  }
  template <typename F>
  void ForRowShards(Index rows, double, const F& fn) {  // one shard, as the CUDA backend
    fn(static_cast<Backend&>(*this), Index(0), rows);
  }
};

// The reference: row-major, as the driver means it, with either input projection.
template <InputProjection kProjection>
struct RowMajorBackend : HostParts<RowMajorBackend<kProjection>> {
  static constexpr InputProjection kInputProjection = kProjection;
  template <typename T>
  void Gemm(bool ta, bool tb, Index m, Index n, Index k, const T* a, Index lda, const T* b,
            Index ldb, T beta, T* c, Index ldc) {
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < n; ++j) {
        T s = 0;
        for (Index p = 0; p < k; ++p)
          s += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
        c[i * ldc + j] = beta == T(0) ? s : s + beta * c[i * ldc + j];
      }
  }
};

// What the CUDA backend does: empty products handled before, the rest mapped to column-major.
struct MappedBackend : HostParts<MappedBackend> {
  static constexpr InputProjection kInputProjection = InputProjection::kWholeSequence;
  int calls = 0;
  template <typename T>
  void Gemm(bool ta, bool tb, Index m, Index n, Index k, const T* a, Index lda, const T* b,
            Index ldb, T beta, T* c, Index ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {  // as CudaBackend: C = beta C
      Loop(m, n, [&](Index i, Index j) {
        c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
      });
      return;
    }
    ColumnMajorGemm<T> g;
    const std::string bad = ToColumnMajor(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, &g);
    if (!bad.empty()) throw std::runtime_error(bad);
    ++calls;
    ColumnMajor(g, beta);
  }

  // BLAS semantics, column-major, with its argument checks.
  template <typename T>
  static void ColumnMajor(const ColumnMajorGemm<T>& g, T beta) {
    const int rows_first = g.trans_first ? g.k : g.m, rows_second = g.trans_second ? g.n : g.k;
    if (g.ld_first < std::max(1, rows_first) || g.ld_second < std::max(1, rows_second) ||
        g.ldc < std::max(1, g.m))
      throw std::runtime_error("leading dimension cuBLAS would reject: m=" +
                               std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" +
                               std::to_string(g.k) + " lds " + std::to_string(g.ld_first) +
                               "," + std::to_string(g.ld_second) + "," + std::to_string(g.ldc));
    for (int j = 0; j < g.n; ++j)
      for (int i = 0; i < g.m; ++i) {
        T s = 0;
        for (int p = 0; p < g.k; ++p) {
          const T x = g.trans_first ? g.first[p + Index(i) * g.ld_first]
                                    : g.first[i + Index(p) * g.ld_first];
          const T y = g.trans_second ? g.second[j + Index(p) * g.ld_second]
                                     : g.second[p + Index(j) * g.ld_second];
          s += x * y;
        }
        T& out = g.c[i + Index(j) * g.ldc];
        out = beta == T(0) ? s : s + beta * out;
      }
  }
};

using Vec = std::vector<double>;

struct Problem {
  CellKind cell;
  Dims d;
  bool bias, mask, dropout;
  Vec x, h0, c0, kernel, rk, b, dy, dh_last, dc_last;
  Vec input_dropout, recurrent_dropout;  // [G, B, I], [G, B, H] when dropout
  std::vector<char> m;  // bool storage
};

Vec Random(std::mt19937& rng, Index n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

struct Outputs {
  Vec y, h_last, c_last, gates, aux, h_prev;
  Vec dx, dh0, dc0, dkernel, drk, dbias;
};

template <typename Backend>
Outputs Run(const Problem& p, int grad_mask) {
  const Dims& d = p.d;
  CallOptions options;
  options.cell = p.cell;
  options.time_major = d.time_major, options.go_backwards = d.go_backwards;
  options.has_bias = p.bias, options.has_mask = p.mask;
  options.has_input_dropout = options.has_recurrent_dropout = p.dropout;
  options.grad_mask = grad_mask;
  options.input_projection = Backend::kInputProjection;
  CallPlan plan;
  const std::string error = CallPlan::Make(options, CallPlan::ShapesFor(options, d), &plan);
  if (!error.empty()) throw std::runtime_error("plan: " + error);
  const Index GH = plan.info().gates * d.H;
  const CacheSizes cs = plan.Cache();
  Outputs o;
  const double nan = std::nan("");
  o.y.assign(d.T * d.B * d.H, nan), o.h_last.assign(d.B * d.H, nan);
  o.c_last.assign(d.B * d.H, nan), o.gates.assign(cs.gates, nan), o.aux.assign(cs.aux, nan);
  o.h_prev.assign(cs.h_prev, nan);
  Vec fws(plan.forward_layout().total, nan);
  InputPointers<double> in;
  in.x = p.x.data(), in.h0 = p.h0.data(), in.c0 = p.c0.data();
  in.kernel = p.kernel.data(), in.recurrent_kernel = p.rk.data();
  in.bias = p.bias ? p.b.data() : nullptr;
  in.mask = p.mask ? reinterpret_cast<const bool*>(p.m.data()) : nullptr;
  in.input_dropout = p.dropout ? p.input_dropout.data() : nullptr;
  in.recurrent_dropout = p.dropout ? p.recurrent_dropout.data() : nullptr;
  ForwardArgs<double> f;
  f.plan = &plan, f.in = in;
  f.y = o.y.data(), f.h_last = o.h_last.data(), f.c_last = o.c_last.data();
  f.gates = {o.gates.data(), cs.gates}, f.aux = {o.aux.data(), cs.aux};
  f.h_prev = {o.h_prev.data(), cs.h_prev};
  f.workspace = {fws.data(), Index(fws.size())};
  Backend be;
  Forward(be, f);

  BackwardArgs<double> a;
  a.plan = &plan, a.in = in;
  a.gates = {o.gates.data(), cs.gates}, a.aux = {o.aux.data(), cs.aux};
  a.h_prev = {o.h_prev.data(), cs.h_prev};
  a.dy = p.dy.data(), a.dh_last = p.dh_last.data(), a.dc_last = p.dc_last.data();
  o.dx.assign(d.T * d.B * d.I, nan), o.dh0.assign(d.B * d.H, nan), o.dc0.assign(d.B * d.H, nan);
  o.dkernel.assign(d.I * GH, nan), o.drk.assign(d.H * GH, nan);
  o.dbias.assign(plan.info().bias_rows * GH, nan);
  a.dx = o.dx.data(), a.dh0 = o.dh0.data(), a.dc0 = o.dc0.data();
  a.dkernel = o.dkernel.data(), a.drecurrent_kernel = o.drk.data(), a.dbias = o.dbias.data();
  Vec bws(plan.backward_layout().total, nan);
  a.workspace = {bws.data(), Index(bws.size())};
  Backward(be, a);
  return o;
}

void Compare(const Vec& got, const Vec& want, const std::string& what) {
  for (size_t i = 0; i < want.size(); ++i) {
    const bool both_nan = std::isnan(got[i]) && std::isnan(want[i]);
    if (!both_nan && !(std::fabs(got[i] - want[i]) <= 1e-12 * (1 + std::fabs(want[i]))))
      throw std::runtime_error(what + "[" + std::to_string(i) + "]: mapped " +
                               std::to_string(got[i]) + " vs row-major " +
                               std::to_string(want[i]));
  }
}

void CompareAll(const Outputs& got, const Outputs& want, const std::string& tag) {
  Compare(got.y, want.y, tag + "y");
  Compare(got.h_last, want.h_last, tag + "h_last");
  Compare(got.c_last, want.c_last, tag + "c_last");
  Compare(got.gates, want.gates, tag + "gates");
  Compare(got.aux, want.aux, tag + "aux");
  Compare(got.h_prev, want.h_prev, tag + "h_prev");
  Compare(got.dx, want.dx, tag + "dx");
  Compare(got.dh0, want.dh0, tag + "dh0");
  Compare(got.dc0, want.dc0, tag + "dc0");
  Compare(got.dkernel, want.dkernel, tag + "dkernel");
  Compare(got.drk, want.drk, tag + "drecurrent_kernel");
  Compare(got.dbias, want.dbias, tag + "dbias");
}

}  // namespace
}  // namespace tfcells

int main() {
  using namespace tfcells;
  std::mt19937 rng(1234);
  const CellKind cells[] = {CellKind::kLstm, CellKind::kGruResetAfter, CellKind::kGruResetBefore,
                            CellKind::kSimpleRnn};
  int cases = 0;
  try {
    for (CellKind cell : cells) {
      for (int layout = 0; layout < 32; ++layout) {
        Problem p;
        p.cell = cell;
        p.d.T = 1 + rng() % 5, p.d.B = 1 + rng() % 4, p.d.I = 1 + rng() % 6;
        p.d.H = 1 + rng() % 5;
        if (layout % 16 == 15) p.d.I = 0;  // empty input projection: the k == 0 path
        p.d.time_major = layout & 1, p.d.go_backwards = layout & 2;
        p.bias = layout & 4, p.mask = layout & 8, p.dropout = layout & 16;
        const Dims& d = p.d;
        const Index G = Info(cell).gates, GH = G * d.H;
        p.x = Random(rng, d.T * d.B * d.I), p.h0 = Random(rng, d.B * d.H, 0.5);
        p.c0 = Random(rng, d.B * d.H, 0.5), p.kernel = Random(rng, d.I * GH, 0.5);
        p.rk = Random(rng, d.H * GH, 0.5);
        p.b = Random(rng, (cell == CellKind::kGruResetAfter ? 2 : 1) * GH, 0.3);
        p.dy = Random(rng, d.T * d.B * d.H), p.dh_last = Random(rng, d.B * d.H);
        p.dc_last = Random(rng, d.B * d.H);
        // Dropout masks: per gate, scaled like Keras' (0 or 2 here), gate-by-gate products.
        for (Vec* m : {&p.input_dropout, &p.recurrent_dropout}) {
          m->resize(G * d.B * (m == &p.input_dropout ? d.I : d.H));
          for (auto& v : *m) v = (rng() % 2) * 2.0;
        }
        p.m.resize(d.T * d.B);
        for (auto& v : p.m) v = (rng() % 3) != 0;
        for (int grad_mask = 0; grad_mask <= kGradAll; ++grad_mask) {
          const Outputs want = Run<RowMajorBackend<InputProjection::kWholeSequence>>(p, grad_mask);
          const std::string tag = "cell " + std::to_string(int(cell)) + " layout " +
                                  std::to_string(layout) + " grad_mask " +
                                  std::to_string(grad_mask) + ": ";
          CompareAll(Run<MappedBackend>(p, grad_mask), want, tag + "mapped ");
          CompareAll(Run<RowMajorBackend<InputProjection::kPerStep>>(p, grad_mask), want,
                     tag + "per-step ");
          ++cases;
        }
      }
    }
  } catch (const std::exception& e) {
    std::printf("FAILED after %d cases: %s\n", cases, e.what());
    return 1;
  }
  std::printf("%d cases ok\n", cases);
  return 0;
}
