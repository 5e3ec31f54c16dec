// CPU backend: single-threaded OpenBLAS GEMMs over all T*B rows and our own packed GEMM for
// each step's recurrent product (step_gemm.h), large ones split across the caller's thread
// pool, and vectorised pointwise loops (O(B*H) per step against O(B*H*G*H) for the GEMMs).
#pragma once

#include <algorithm>
#include <memory>
#include <type_traits>

#include "../common.h"
#include "cpu_dispatch.h"
#include "cpu_rnn.h"
#include "cpu_tuning.h"
#include "step_gemm.h"
#include "step_parts.h"

namespace tfcells {
TFCELLS_ISA_BEGIN

struct CpuBackend {
  static constexpr InputProjection kInputProjection = kCpuInputProjection;
  // Tuning constants: cpu_tuning.h.
  const ParallelRunner* runner = nullptr;
  int max_tasks = 1;
  Index l2_cache_bytes = 0;  // one core's
  bool split_units = false;  // CpuOptions::split_units
  bool pin_shards = false;   // CpuOptions::pin_shards
  Index min_parallel_elements = cpu_tuning::kMinParallelElements;  // or CpuOptions'
  RowCopies row_copies = RowCopies::kNever;  // CpuOptions', kAuto resolved (ResolveRowCopies)
  // A part of a split step: its own scratch (StepWork::part_scratch_bytes), else null.
  unsigned char* part_scratch = nullptr;
  // Step products on bfloat16 pairs (a call with bfloat16 storage, CpuOptions::products).
  bool bf16_products = false;
  // The float32 whole-sequence GEMMs (the weight gradients) on bfloat16 pairs too: PairGemm, on
  // AMX tiles at the amx level, else on the pair kernel (VectorPairs). On with bf16_products.
  bool bf16_gemms = false;

  // PairGemm's packed op(B) and what it was packed from.
  struct PackedB {
    const float* b;
    Index ldb, k, n;
    bool trans_b;
    bool operator==(const PackedB& o) const {
      return b == o.b && ldb == o.ldb && k == o.k && n == o.n && trans_b == o.trans_b;
    }
  };
  std::unique_ptr<TilePairOperand> packed_b;
  PackedB packed_b_key{};

  void Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a, Index lda,
            const float* b, Index ldb, float beta, float* c, Index ldc);
  void Gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const double* a, Index lda,
            const double* b, Index ldb, double beta, double* c, Index ldc);
  // The same on the calling thread (one BLAS call).
  static void CallingThreadGemm(bool trans_a, bool trans_b, Index m, Index n, Index k,
                                const float* a, Index lda, const float* b, Index ldb, float beta,
                                float* c, Index ldc);
  static void CallingThreadGemm(bool trans_a, bool trans_b, Index m, Index n, Index k,
                                const double* a, Index lda, const double* b, Index ldb,
                                double beta, double* c, Index ldc);

  template <typename T>
  PackedOperand<T> StepOperand(bool trans, Index k, Index n, const T* w, Index ld) const {
    return PackedOperand<T>(trans, k, n, w, ld, bf16_products);
  }

  // A backend for one shard or part of a time loop: this one's settings, on the calling thread.
  CpuBackend Sequential() const {
    CpuBackend be;
    be.l2_cache_bytes = l2_cache_bytes;
    be.min_parallel_elements = min_parallel_elements;
    be.row_copies = row_copies;
    be.bf16_products = bf16_products;
    be.bf16_gemms = bf16_gemms;
    return be;
  }

  // Splits [0, extent) into contiguous blocks of a multiple of `align` (the last may be
  // shorter), at most *tasks of them: returns the block length (at least `align`) and sets
  // *tasks to the number of blocks (0 for an empty extent).
  static Index AlignedBlocks(Index extent, Index align, int* tasks) {
    const Index block =
        std::max(align, ((extent + *tasks - 1) / *tasks + align - 1) / align * align);
    *tasks = static_cast<int>(std::min<Index>(*tasks, (extent + block - 1) / block));
    return block;
  }

  // Pieces a GEMM of `flops` splits into, at most `pieces`: one below the size that pays for
  // the hand-offs.
  int GemmTasks(double flops, Index pieces) const {
    return runner && flops >= cpu_tuning::kMinParallelGemmFlops
               ? static_cast<int>(std::min<Index>(max_tasks, pieces))
               : 1;
  }

  // kAuto stays kAuto (copy where A's rows share L1 sets) only where L1 has fewer ways than a
  // block of the step GEMM has rows, else becomes kNever (why: cpu_tuning::kRowSetBytes).
  static RowCopies ResolveRowCopies(RowCopies requested) {
    const int ways = CpuL1DataWays();
    const bool few_ways = ways > 0 && ways < cpu_tuning::kStepRows;
    return requested == RowCopies::kAuto && !few_ways ? RowCopies::kNever : requested;
  }

  // Whether a step product copies each block of A's rows first, A's rows `lda` elements apart.
  template <typename T>
  bool CopiesRows(Index lda) const {
    return row_copies == RowCopies::kAlways ||
           (row_copies == RowCopies::kAuto &&
            lda * Index(sizeof(T)) % cpu_tuning::kRowSetBytes == 0);
  }

  // Large steps split the operand's column panels across the pool; each output element has
  // one writer and the same sum order either way.
  template <typename T>
  void StepGemm(Index m, const T* a, Index lda, const PackedOperand<T>& w, T beta, T* c,
                Index ldc) {
    const Index panels = w.Panels();
    if (m == 0 || panels == 0) return;
    const bool copy_rows = CopiesRows<T>(lda);
    if (copy_rows) CountWork(kRowCopyProducts);
    const int tasks = GemmTasks(2.0 * m * w.n() * w.k(), panels);
    if (tasks <= 1) return w.Multiply(m, a, lda, beta, c, ldc, 0, panels, copy_rows);
    const Index block = (panels + tasks - 1) / tasks;
    (*runner)(tasks, [&](int task) {
      const Index begin = task * block;
      w.Multiply(m, a, lda, beta, c, ldc, begin, std::min(panels, begin + block), copy_rows);
    });
  }

  // C = op(A)·op(B) + βC (row-major, as Gemm) on bfloat16 pairs accumulated in float32, on
  // Tiles (step_gemm.h): op(B) packed as pair panels (for the weight gradients B is the gate
  // gradients, read row after row), op(A)'s rows rounded 32 at a time (A = x or h_prev, read
  // transposed), k in slabs, blocks of rows split across the pool. k > 0.
  // op(B) is packed once for consecutive calls with the same B: the weight gradients of a
  // backward pass multiply the same gate gradients (written before the first of them) by x and
  // by h_prev.
  template <typename Tiles>
  void PairGemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a,
                Index lda, const float* b, Index ldb, float beta, float* c, Index ldc) {
    constexpr Index kBlock = step_gemm::kTileBlockRows;
    const Index blocks = (m + kBlock - 1) / kBlock;
    const int tasks = GemmTasks(2.0 * m * n * k, blocks);
    const PackedB key{b, ldb, k, n, trans_b};
    if (!packed_b || !(packed_b_key == key)) {
      packed_b.reset();  // free the last one first
      packed_b = std::make_unique<TilePairOperand>(
          trans_b, k, n, b, ldb, [&](Index count, const auto& pack) {
            const int pieces = static_cast<int>(std::min<Index>(tasks, count));
            if (pieces <= 1) return pack(Index(0), count);
            (*runner)(pieces, [&](int piece) {
              pack(count * piece / pieces, count * (piece + 1) / pieces);
            });
          });
      packed_b_key = key;
    }
    const TilePairOperand& packed = *packed_b;
    auto run = [&](int task) {
      const Index r0 = blocks * task / tasks * kBlock,
                  r1 = std::min(m, blocks * (task + 1) / tasks * kBlock);
      packed.template MultiplyPairTilesInSlabs<Tiles>(r1 - r0, trans_a ? a + r0 : a + r0 * lda,
                                                      lda, trans_a, beta, c + r0 * ldc, ldc);
    };
    if (tasks <= 1) return run(0);
    (*runner)(tasks, run);
  }

  // The dropout weight gradients of x and h_prev, every gate (MaskedProducts: common.h).
  // Written out whole, each masked operand would go to memory and come back for a BLAS GEMM,
  // which packs it (and B) once more, and every gate would read x, h_prev and B's rows from
  // memory again. Here each task takes kMaskedChunkRows rows at a time and, gate by gate, packs
  // B's gate columns (once for both products where they share B) and each product's masked
  // rows into `scratch` (at least k * m elements of the larger m) in the layout
  // step_gemm::ChunkProduct multiplies, and adds up the chunks' products in order: each row is
  // read from memory once, the gates after the first find it in L2. The rows are summed in
  // kMaskedRowParts parts, the first into C and the others into partial sums added to it after,
  // so that each task packs only its part's rows (with C's rows split between tasks instead,
  // every task packs all of B again); C's rows are split as well only where there are more tasks
  // than parts. The parts depend on the shape alone, so the sums do not depend on the number of
  // tasks. Where scratch has no room for that, and on the bfloat16 pair path (PairGemm keeps B
  // packed for the next product by the same B), each product runs through MaskedGemmsByGate.
  template <typename T, typename XRows, typename HRows>
  void MaskedGemms(Index n, Index k, const MaskedProducts<T, XRows>& x,
                   const MaskedProducts<T, HRows>& h, T* scratch) {
    constexpr Index kRows = step_gemm::kChunkRows, kCols = step_gemm::kChunkCols<T>;
    const Index mx = x.gates ? x.m : 0, mh = h.gates ? h.m : 0;
    const Index x_sums = mx * x.gates * n, h_sums = mh * h.gates * n;  // C's elements
    if (n == 0 || x_sums + h_sums == 0) return;
    const int gemm_tasks = GemmTasks(2.0 * k * (x_sums + h_sums), max_tasks);
    struct Split {  // rows summed in `parts` parts, C's rows in col_tasks blocks
      Index parts, part_rows, chunk, block_x, block_h, a_size, task_size;
      int col_tasks;
    };
    auto split_in = [&](Index parts) {
      Split sp;
      sp.parts = parts, sp.part_rows = (k + parts - 1) / parts;
      sp.chunk = std::min(cpu_tuning::kMaskedChunkRows, sp.part_rows);
      const int wanted = (gemm_tasks + int(parts) - 1) / int(parts);
      int tasks_x = wanted, tasks_h = wanted;
      sp.block_x = AlignedBlocks(std::max<Index>(mx, 1), kRows, &tasks_x);
      sp.block_h = AlignedBlocks(std::max<Index>(mh, 1), kRows, &tasks_h);
      sp.col_tasks = std::max(tasks_x, tasks_h);
      const Index a_rows = (std::max(sp.block_x, sp.block_h) + kRows - 1) / kRows * kRows;
      sp.a_size = a_rows * sp.chunk;                                     // A's blocks
      sp.task_size = sp.a_size + (n + kCols - 1) / kCols * kCols * sp.chunk;  // and B's panels
      return sp;
    };
    auto size = [&](const Split& sp) {  // every task's packed chunks, then the partial sums
      return sp.parts * sp.col_tasks * sp.task_size + (sp.parts - 1) * (x_sums + h_sums);
    };
    const Index room = k * std::max(mx, mh);
    // Parts of at least a whole chunk each (and none empty), where scratch has room for them.
    constexpr Index kParts = cpu_tuning::kMaskedRowParts;
    Split sp = split_in(k >= kParts * cpu_tuning::kMaskedChunkRows ? kParts : 1);
    if (size(sp) > room) sp = split_in(1);
    if (bf16_gemms || k == 0 || size(sp) > room)
      return MaskedGemmsByGate(*this, n, k, x, h, scratch);
    T* const partials_x = scratch + sp.parts * sp.col_tasks * sp.task_size;  // parts 1..
    T* const partials_h = partials_x + (sp.parts - 1) * x_sums;
    auto run = [&](int task) {
      const Index part = task / sp.col_tasks, column_task = task % sp.col_tasks;
      const Index begin = part * sp.part_rows, end = std::min(k, begin + sp.part_rows);
      T* const a_blocks = scratch + task * sp.task_size;  // this task's
      T* const b_panels = a_blocks + sp.a_size;
      const Index whole_panels = n / kCols * kCols;
      // Packs rows [r0, r0 + rows) of B's gate g columns into panels (zero past n).
      auto pack_b = [&](const T* b, Index ldb, Index r0, Index rows) {
        for (Index r = 0; r < rows; ++r) {
          const T* const b_row = b + (r0 + r) * ldb;
          T* const dst = b_panels + r * kCols;  // panel j / kCols at dst + j * chunk
          for (Index j = 0; j < whole_panels; j += kCols) {
#pragma omp simd
            for (Index v = 0; v < kCols; ++v) dst[j * sp.chunk + v] = b_row[j + v];
          }
          for (Index v = 0; whole_panels < n && v < kCols; ++v)
            dst[whole_panels * sp.chunk + v] =
                whole_panels + v < n ? b_row[whole_panels + v] : T(0);
        }
      };
      // Packs columns [c0, c0 + cols) of the rows [r0, r0 + rows) of A = rows_of_a into
      // k-major blocks of kRows columns, and adds their product with the packed B to `out`.
      auto product = [&](const auto& rows_of_a, Index c0, Index cols, Index r0, Index rows,
                         T* out, Index ld_out) {
        const Index whole_blocks = cols / kRows * kRows;
        for (Index r = 0; r < rows; ++r) {
          const auto row = rows_of_a.RowAt(r0 + r);
          T* const dst = a_blocks + r * kRows;  // block i / kRows at dst + i * chunk
          for (Index i = 0; i < whole_blocks; i += kRows) {
#pragma omp simd
            for (Index j = 0; j < kRows; ++j) dst[i * sp.chunk + j] = row(c0 + i + j);
          }
          for (Index j = whole_blocks; j < cols; ++j)
            dst[whole_blocks * sp.chunk + j - whole_blocks] = row(c0 + j);
        }
        step_gemm::ChunkProduct(cols, n, rows, a_blocks, kRows * sp.chunk, b_panels,
                                kCols * sp.chunk, r0 == begin ? T(0) : T(1), out, ld_out);
      };
      for (Index r0 = begin; r0 < end; r0 += sp.chunk) {
        const Index rows = std::min(sp.chunk, end - r0);
        for (int g = 0; g < x.gates || g < h.gates; ++g) {
          const T* packed = nullptr;  // whose gate g columns b_panels holds
          auto each = [&](const auto& p, Index block, T* partials) {
            const Index c0 = column_task * block;
            if (g >= p.gates || c0 >= p.m) return;
            const T* const b = p.b + g * n;
            if (packed != b) pack_b(b, p.ldb, r0, rows), packed = b;
            T* const out = part == 0 ? p.c + c0 * p.ldc : partials + ((part - 1) * p.m + c0) *
                                                                         p.gates * n;
            product(p.rows(g), c0, std::min(block, p.m - c0), r0, rows, out + g * n,
                    part == 0 ? p.ldc : p.gates * n);
          };
          each(x, sp.block_x, partials_x);
          each(h, sp.block_h, partials_h);
        }
      }
    };
    const int tasks = sp.col_tasks * static_cast<int>(sp.parts);
    if (gemm_tasks > 1 && tasks > 1)
      (*runner)(tasks, run);
    else
      for (int task = 0; task < tasks; ++task) run(task);
    auto add_partials = [&](const auto& p, const T* partials) {
      const Index width = p.gates * n;
      for (Index part = 1; part < sp.parts && width > 0; ++part)
        ForEach(p.m, width, StoreViewPoint<T, StepMatrix<const T>>{
                                {p.c, p.ldc}, Plain<const T>(partials + (part - 1) * p.m * width,
                                                             width), true});
    };
    add_partials(x, partials_x);
    add_partials(h, partials_h);
  }

  // A shard's scratch: a part's own, from `offset` elements on, or the plan's.
  template <typename T>
  T* Scratch(T* planned, Index offset) const {
    return part_scratch ? reinterpret_cast<T*>(part_scratch) + offset : planned;
  }

  // The same for the units `u` of each `block`-wide column block of op(W) only, on the calling
  // thread (a shard of ForShards: u and block are multiples of the panel width).
  template <typename T>
  void StepGemm(Index m, const T* a, Index lda, const PackedOperand<T>& w, T beta, T* c,
                Index ldc, Index block, Units u) {
    if (u.Count() == block) return StepGemm(m, a, lda, w, beta, c, ldc);
    constexpr Index P = PackedOperand<T>::kPanelCols;  // (the last panel may be partial)
    const bool copy_rows = CopiesRows<T>(lda);
    if (copy_rows) CountWork(kRowCopyProducts);
    for (Index j = u.begin; j < w.n(); j += block)
      w.Multiply(m, a, lda, beta, c, ldc, j / P, (j + u.Count() + P - 1) / P, copy_rows);
  }

  // How many steps' products by W_x run back to back (at most `planned`, the plan's
  // projection_steps): several only where W_x and W_h, `weights` elements packed as this
  // call's step products pack them, would take turns in L2 at every step.
  template <typename T>
  Index ProjectionSteps(Index planned, Index weights) const {
    const Index bytes = weights * Index(bf16_products ? 2 : sizeof(T));
    return bytes * cpu_tuning::kProjectionL2Share > l2_cache_bytes ? planned : 1;
  }

  // Units split on multiples of this: whole panels of every packed operand (float32, float64,
  // bfloat16 pairs and tiles), at every level.
  static constexpr Index kUnitAlign = 32;
  static_assert(kUnitAlign % PackedOperand<float>::kPanelCols == 0 &&
                    kUnitAlign % PackedOperand<double>::kPanelCols == 0 &&
                    kUnitAlign % TilePairOperand::kPanelCols == 0,
                "units split on whole panels");

  // The time loop of `steps` steps over `rows` batch rows and `units` units: fn(sb, b0, b1,
  // units, s, wait) runs step s of one shard (wait(): every shard has finished step s - 1).
  // Batch shards (ForRowShards) need no synchronisation, but each thread reads all of a step's
  // weights at every step. With split_units (opt-in: spinning threads lose to batch shards
  // where other ops share the pool), where the weights are several times a core's L2
  // (kUnitSplitL2Share) and the cell allows it, each step's units are split across the pool
  // instead (StepParts), as oneDNN does: each thread then reads only its share of the weights,
  // for all rows, and the threads exchange h every step (README: measured both ways).
  template <typename F>
  void ForShards(Index rows, Index units, Index steps, const StepWork& work, const F& fn) {
    int parts = runner && split_units && work.units_may_split && units % kUnitAlign == 0 &&
                        work.weight_bytes >= l2_cache_bytes * cpu_tuning::kUnitSplitL2Share &&
                        work.flops >= cpu_tuning::kMinUnitSplitStepFlops
                    ? max_tasks
                    : 1;
    const Index block = AlignedBlocks(units, kUnitAlign, &parts);
    if (parts > 1) {
      StepParts loop(parts, steps);
      // Each task's scratch, allocated here (a throw inside a pool task would end the process),
      // in 8-byte elements (aligned for float and double).
      const Index per_task = (work.part_scratch_bytes + 7) / 8;
      const std::unique_ptr<double[]> scratch(per_task ? new double[parts * per_task] : nullptr);
      ShardCpus cpus;
      (*runner)(parts, [&](int task) {
        const ShardCpus::Pin pin(cpus, pin_shards);
        CpuBackend shard = Sequential();
        if (per_task)
          shard.part_scratch = reinterpret_cast<unsigned char*>(scratch.get() + task * per_task);
        // (A task runs another's part inside wait(), after its own step has done with the
        // scratch before wait() and before it uses it after: StepParts.)
        loop.Run(task, [&](int part, Index s, const auto& wait) {
          const Index u0 = part * block;
          fn(shard, Index(0), rows, Units{u0, std::min(units, u0 + block)}, s, wait);
        });
      });
      return;
    }
    ForRowShards(rows, steps, work.flops, [&](CpuBackend& sb, Index b0, Index b1, Index s) {
      fn(sb, b0, b1, Units{0, units}, s, [] {});
    });
  }

  // Batch shards run on the pool, each by its own thread from the first step to the last: no
  // per-step hand-offs, and the packed step GEMM is as fast on a shard's rows as on all of
  // them (ShardSteps: another thread runs a shard's steps until its thread starts). Only when
  // there are too few rows to give every thread a shard and a step is large does one shard
  // split each step's GEMM and pointwise loop across the pool instead (step_flops: for all
  // rows). fn(sb, b0, b1, s) runs step s of rows [b0, b1).
  template <typename F>
  void ForRowShards(Index rows, Index steps, double step_flops, const F& fn) {
    // One shard per thread: more would run the caller beside all of the pool's threads
    // (heavier tails measured, same median).
    int tasks =
        runner ? static_cast<int>(std::min<Index>(max_tasks, rows / cpu_tuning::kMinShardRows))
               : 1;
    if (tasks < max_tasks && step_flops >= cpu_tuning::kMaxShardedStepFlops) tasks = 1;
    if (tasks <= 1) {
      for (Index s = 0; s < steps; ++s) fn(*this, Index(0), rows, s);
      return;
    }
    ShardSteps loop(tasks, steps);
    // One per shard, as a shard's steps may run on several threads.
    const std::unique_ptr<CpuBackend[]> shards(new CpuBackend[tasks]);
    for (int p = 0; p < tasks; ++p) shards[p] = Sequential();
    ShardCpus cpus;
    (*runner)(tasks, [&](int task) {
      const ShardCpus::Pin pin(cpus, pin_shards);
      loop.Run(task, [&](int p, Index s) {  // near-equal shards, none empty (tasks <= rows)
        fn(shards[p], rows * p / tasks, rows * (p + 1) / tasks, s);
      });
    });
  }

  // Rows are split across the pool when there is enough work to pay for the hand-off.
  template <typename F>
  void ForEach(Index rows, Index cols, const F& functor) {
    const int tasks = (runner && rows * cols >= min_parallel_elements)
                          ? static_cast<int>(std::min<Index>(max_tasks, rows))
                          : 1;
    if (tasks <= 1) return ForEachRow(0, rows, cols, functor);
    const Index block = (rows + tasks - 1) / tasks;
    (*runner)(tasks, [&](int task) {
      const Index begin = task * block;
      ForEachRow(begin, std::min(rows, begin + block), cols, functor);
    });
  }

  // Flattened: every call inside, the functor's and its activations', is inlined, so that the
  // loop vectorises (GCC's own limits left the LSTM's forward functor out of line, a scalar call
  // per element, at every level).
  template <typename F>
  [[gnu::flatten]] static void ForEachRow(Index begin, Index end, Index cols, const F& functor) {
    const F f = functor;  // a local copy: its pointers provably not clobbered by the stores
    if constexpr (HasPrefetch<F>::value) {
      // A cache line's columns at a time, asking for the next row's lines as it goes (cells.h,
      // kPrefetchColumns). Intel Xeon, T=100, B=64, I=H=256, with and without in one process
      // (alternating calls, median of 15): training steps LSTM 1.05x, GRU 1.10x (reset_before
      // 1.07x), the LSTM's training forward 1.07x; inference and SimpleRNN level to 1.03x.
      constexpr Index kChunk = F::kPrefetchColumns;
      for (Index b = begin; b < end; ++b) {
        const bool next = b + 1 < end;
        for (Index j0 = 0; j0 < cols; j0 += kChunk) {
          if (next) f.Prefetch(b + 1, j0);
          const Index j1 = std::min(cols, j0 + kChunk);
#pragma omp simd
          for (Index j = j0; j < j1; ++j) f(b, j);
        }
      }
    } else {
      for (Index b = begin; b < end; ++b) {
#pragma omp simd
        for (Index j = 0; j < cols; ++j) f(b, j);
      }
    }
  }
  template <typename F, typename = void>
  struct HasPrefetch : std::false_type {};
  template <typename F>
  struct HasPrefetch<F, std::void_t<decltype(&F::Prefetch)>> : std::true_type {};

  const bool* TrueFlag() const {
    static const bool kTrue = true;
    return &kTrue;
  }

  // Column blocks are split across the pool: each output element has one writer, and the
  // summation order (row by row) does not depend on the split, so results are deterministic.
  template <typename T>
  void ColumnSum(Index rows, Index cols, const T* a, Index lda, T* out) {
    constexpr Index kAlign = cpu_tuning::kColumnSumAlign;
    int tasks = runner && rows * cols >= min_parallel_elements ? max_tasks : 1;
    const Index block = AlignedBlocks(cols, kAlign, &tasks);
    auto sum = [&](int task) {
      const Index begin = task * block, end = std::min(cols, begin + block);
      for (Index j = begin; j < end; ++j) out[j] = T(0);
      for (Index r = 0; r < rows; ++r) {
        const T* row = a + r * lda;
#pragma omp simd
        for (Index j = begin; j < end; ++j) out[j] += row[j];
      }
    };
    if (tasks <= 1) return sum(0);
    (*runner)(tasks, sum);
  }
};

TFCELLS_ISA_END
}  // namespace tfcells
