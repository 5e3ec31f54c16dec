// Host-only check of the CUDA backend's GEMM mapping (gemm_mapping.h), runnable on machines
// without a GPU: the whole recurrence driver runs with plain row-major GEMMs and with every GEMM
// turned into the column-major call cuBLAS would receive, executed by a reference column-major
// GEMM that also enforces BLAS' leading-dimension rules (what cuBLAS answers with
// CUBLAS_STATUS_INVALID_VALUE). Both run the input projection and dx over all T*B rows, as the
// CUDA backend does; a third run does them a step at a time, as the CPU backend does, so the
// two driver paths are held to each other. Outputs must agree for every cell, layout, mask
// (dropout or not) and gradient mask.
// Calls with 16-bit storage run as the CUDA backend runs them: the float32 pass with every
// GEMM's operands rounded to the storage type (ProductsFor; cuBLAS' FAST_16BF / FAST_16F
// compute types), checked mapped against row-major bit for bit and against float64 within
// 16-bit accuracy. Built and run by tests/test_cuda.py:
//   g++ -std=c++17 -I csrc csrc/cuda/host_check.cc csrc/core/plan.cc -o host_check
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/rnn.h"
#include "../core/storage.h"
#include "gemm_mapping.h"

namespace tfcells {
namespace {

template <typename F>
void Loop(Index rows, Index cols, const F& f) {
  for (Index b = 0; b < rows; ++b)
    for (Index j = 0; j < cols; ++j) f(b, j);
}

template <typename Backend>  // the derived backend, handed to ForShards' callback
struct HostParts : InPlaceStepOperands<Backend> {
  GpuProducts products = GpuProducts::kFloat32;  // set by Run, as cuda_rnn_impl.cuh does

  // A GEMM operand as the tensor cores read it: float32 rounded to 16 bits where the
  // products are 16-bit (TF32 is not emulated: no call here allows it).
  template <typename T>
  T Operand(T v) const {
    if constexpr (std::is_same_v<T, float>) {
      if (products == GpuProducts::kBFloat16) return ToFloat(FromFloat<bfloat16>(v));
      if (products == GpuProducts::kFloat16) return ToFloat(FromFloat<float16>(v));
    }
    return v;
  }

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
  // As the CUDA backend: each masked operand written out whole, then one GEMM.
  template <typename T, typename XRows, typename HRows>
  void MaskedGemms(Index n, Index k, const MaskedProducts<T, XRows>& x,
                   const MaskedProducts<T, HRows>& h, T* scratch) {
    MaskedGemmsByGate(static_cast<Backend&>(*this), n, k, x, h, scratch);
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
          s += this->Operand(ta ? a[p * lda + i] : a[i * lda + p]) *
               this->Operand(tb ? b[j * ldb + p] : b[p * ldb + j]);
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
  void ColumnMajor(const ColumnMajorGemm<T>& g, T beta) const {
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
          s += Operand(x) * Operand(y);
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

// A value of the call's types, from and to the problem's doubles (16-bit: rounded to nearest).
template <typename S>
S From(double v) {
  if constexpr (std::is_same_v<S, bfloat16> || std::is_same_v<S, float16>)
    return FromFloat<S>(static_cast<float>(v));
  else
    return static_cast<S>(v);
}
template <typename S>
double ToDouble(S v) {
  if constexpr (std::is_same_v<S, bfloat16> || std::is_same_v<S, float16>)
    return ToFloat(v);
  else
    return static_cast<double>(v);
}
template <typename S>
std::vector<S> Cast(const Vec& v) {
  std::vector<S> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = From<S>(v[i]);
  return out;
}
template <typename S>
Vec Widen(const std::vector<S>& v) {
  Vec out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = ToDouble(v[i]);
  return out;
}

// One forward and backward pass in compute type T with storage S (16-bit: as the CUDA backend
// runs it, with its products), every output widened to double.
template <typename Backend, typename T = double, typename S = T>
Outputs Run(const Problem& p, int grad_mask) {
  const Dims& d = p.d;
  CallOptions options;
  options.cell = p.cell;
  options.time_major = d.time_major, options.go_backwards = d.go_backwards;
  options.has_bias = p.bias, options.has_mask = p.mask;
  options.has_input_dropout = options.has_recurrent_dropout = p.dropout;
  options.grad_mask = grad_mask;
  options.input_projection = Backend::kInputProjection;
  options.storage = detail::StorageOf<S>();
  CallPlan plan;
  const std::string error = CallPlan::Make(options, CallPlan::ShapesFor(options, d), &plan);
  if (!error.empty()) throw std::runtime_error("plan: " + error);
  const Index GH = plan.info().gates * d.H;
  const CacheSizes cs = plan.Cache();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const S s_nan = From<S>(std::nan(""));
  const std::vector<S> x = Cast<S>(p.x), h0 = Cast<S>(p.h0), c0 = Cast<S>(p.c0);
  const std::vector<S> dy = Cast<S>(p.dy), dh_last = Cast<S>(p.dh_last);
  const std::vector<S> dc_last = Cast<S>(p.dc_last);
  const std::vector<T> kernel = Cast<T>(p.kernel), rk = Cast<T>(p.rk), b = Cast<T>(p.b);
  const std::vector<T> in_drop = Cast<T>(p.input_dropout);
  const std::vector<T> rec_drop = Cast<T>(p.recurrent_dropout);
  std::vector<S> y(d.T * d.B * d.H, s_nan), h_last(d.B * d.H, s_nan), c_last(d.B * d.H, s_nan);
  std::vector<T> gates(cs.gates, nan), aux(cs.aux, nan), h_prev(cs.h_prev, nan);
  std::vector<T> fws(plan.forward_layout().total, nan);
  InputPointers<T, S> in;
  in.x = x.data(), in.h0 = h0.data(), in.c0 = c0.data();
  in.kernel = kernel.data(), in.recurrent_kernel = rk.data();
  in.bias = p.bias ? b.data() : nullptr;
  in.mask = p.mask ? reinterpret_cast<const bool*>(p.m.data()) : nullptr;
  in.input_dropout = p.dropout ? in_drop.data() : nullptr;
  in.recurrent_dropout = p.dropout ? rec_drop.data() : nullptr;
  ForwardArgs<T, S> f;
  f.plan = &plan, f.in = in;
  f.y = y.data(), f.h_last = h_last.data(), f.c_last = c_last.data();
  f.gates = {gates.data(), cs.gates}, f.aux = {aux.data(), cs.aux};
  f.h_prev = {h_prev.data(), cs.h_prev};
  f.workspace = {fws.data(), Index(fws.size())};
  Backend be;
  be.products = ProductsFor(options.storage, false);
  Forward(be, f);

  BackwardArgs<T, S> a;
  a.plan = &plan, a.in = in;
  a.gates = {gates.data(), cs.gates}, a.aux = {aux.data(), cs.aux};
  a.h_prev = {h_prev.data(), cs.h_prev};
  a.y = y.data();
  a.dy = dy.data(), a.dh_last = dh_last.data(), a.dc_last = dc_last.data();
  std::vector<S> dx(d.T * d.B * d.I, s_nan), dh0(d.B * d.H, s_nan), dc0(d.B * d.H, s_nan);
  std::vector<T> dkernel(d.I * GH, nan), drk(d.H * GH, nan);
  std::vector<T> dbias(plan.info().bias_rows * GH, nan);
  a.dx = dx.data(), a.dh0 = dh0.data(), a.dc0 = dc0.data();
  a.dkernel = dkernel.data(), a.drecurrent_kernel = drk.data(), a.dbias = dbias.data();
  std::vector<T> bws(plan.backward_layout().total, nan);
  a.workspace = {bws.data(), Index(bws.size())};
  Backward(be, a);

  Outputs o;
  o.y = Widen(y), o.h_last = Widen(h_last), o.c_last = Widen(c_last);
  o.gates = Widen(gates), o.aux = Widen(aux), o.h_prev = Widen(h_prev);
  o.dx = Widen(dx), o.dh0 = Widen(dh0), o.dc0 = Widen(dc0);
  o.dkernel = Widen(dkernel), o.drk = Widen(drk), o.dbias = Widen(dbias);
  return o;
}

// Equal to 1e-12 (relative): the same products summed in the same order. With `tolerance`:
// max |got - want| <= tolerance * (1 + max |want|), the error of 16-bit arithmetic.
void Compare(const Vec& got, const Vec& want, const std::string& what, double tolerance) {
  double scale = 0;
  for (double w : want) scale = std::isnan(w) ? scale : std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    const bool both_nan = std::isnan(got[i]) && std::isnan(want[i]);
    const double bound =
        tolerance > 0 ? tolerance * (1 + scale) : 1e-12 * (1 + std::fabs(want[i]));
    if (!both_nan && !(std::fabs(got[i] - want[i]) <= bound))
      throw std::runtime_error(what + "[" + std::to_string(i) + "]: got " +
                               std::to_string(got[i]) + ", want " + std::to_string(want[i]));
  }
}

void CompareAll(const Outputs& got, const Outputs& want, const std::string& tag,
                double tolerance = 0) {
  static const std::pair<Vec Outputs::*, const char*> kFields[] = {
      {&Outputs::y, "y"},       {&Outputs::h_last, "h_last"}, {&Outputs::c_last, "c_last"},
      {&Outputs::gates, "gates"}, {&Outputs::aux, "aux"},     {&Outputs::h_prev, "h_prev"},
      {&Outputs::dx, "dx"},     {&Outputs::dh0, "dh0"},       {&Outputs::dc0, "dc0"},
      {&Outputs::dkernel, "dkernel"}, {&Outputs::drk, "drecurrent_kernel"},
      {&Outputs::dbias, "dbias"}};
  for (const auto& [field, name] : kFields)
    Compare(got.*field, want.*field, tag + name, tolerance);
}

// The problem with its storage-typed inputs rounded to S, for a float64 reference that sees
// what the 16-bit call sees.
template <typename S>
Problem RoundedTo(Problem p) {
  for (Vec* v : {&p.x, &p.h0, &p.c0, &p.dy, &p.dh_last, &p.dc_last}) *v = Widen(Cast<S>(*v));
  return p;
}

// The 16-bit checks of one problem: the mapped GEMMs equal the row-major ones bit for bit with
// the same rounded operands, and the pass stays within 16-bit accuracy of float64.
template <typename S>
void Check16Bit(const Problem& p, int grad_mask, double tolerance, const std::string& tag) {
  using WholeSequence = RowMajorBackend<InputProjection::kWholeSequence>;
  const Outputs mapped = Run<MappedBackend, float, S>(p, grad_mask);
  CompareAll(mapped, Run<WholeSequence, float, S>(p, grad_mask), tag + "mapped ");
  CompareAll(mapped, Run<WholeSequence>(RoundedTo<S>(p), grad_mask), tag + "vs float64 ",
             tolerance);
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
    // Which products each call gets (what cuda_rnn_impl.cuh hands the backend).
    const bool products_ok =
        ProductsFor(Storage::kBFloat16, false) == GpuProducts::kBFloat16 &&
        ProductsFor(Storage::kBFloat16, true) == GpuProducts::kBFloat16 &&
        ProductsFor(Storage::kFloat16, false) == GpuProducts::kFloat16 &&
        ProductsFor(Storage::kFloat16, true) == GpuProducts::kFloat16 &&
        ProductsFor(Storage::kCompute, false) == GpuProducts::kFloat32 &&
        ProductsFor(Storage::kCompute, true) == GpuProducts::kTf32;
    if (!products_ok) throw std::runtime_error("ProductsFor maps a storage to the wrong products");
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
          if (grad_mask == 0 || grad_mask == kGradAll || grad_mask % 7 == layout % 7) {
            Check16Bit<bfloat16>(p, grad_mask, 3e-2, tag + "bfloat16 ");
            Check16Bit<float16>(p, grad_mask, 4e-3, tag + "float16 ");
          }
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
