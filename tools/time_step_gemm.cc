// Single-core GFLOP/s of the packed step GEMM (csrc/core/cpu/step_gemm.h) for several register
// blockings, at the recurrence's shapes (m rows = 8..256, k = 256, n = 1024). A tuning aid, not
// a test. Build for one level and run, e.g. for x86-64-v3 (for the amx level, which also times
// the bfloat16 tile products: -march=x86-64-v4 -mavx512bf16 -mavx512fp16 -mamx-tile -mamx-bf16
// -DTFCELLS_ISA=isa_amx):
//   g++ -O3 -std=c++17 -march=x86-64-v3 -DTFCELLS_ISA=isa_x86_64_v3 tools/time_step_gemm.cc \
//       -o /tmp/time_step_gemm && /tmp/time_step_gemm
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "../csrc/core/cpu/step_gemm.h"
#if TFCELLS_AMX_TILES
#include <sys/syscall.h>
#include <unistd.h>
#endif

using namespace tfcells;

template <int ROWS, int VECS>
double GflopsPerSecond(Index m, Index k, Index n) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  std::vector<float> a(m * k), w(k * n), c(m * n);
  for (float& e : a) e = dist(rng);
  for (float& e : w) e = dist(rng);
  const PackedOperand<float, ROWS, VECS> packed(false, k, n, w.data(), n);
  const double flops = 2.0 * m * k * n;
  const int reps = std::max(1, static_cast<int>(1e8 / flops));  // ~3 ms per timing at 40 GF/s
  double best = 1e30;
  for (int trial = 0; trial < 40; ++trial) {  // best of 40 short runs: the machine may be shared
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r)
      packed.Multiply(m, a.data(), k, 0.0f, c.data(), n, 0, packed.Panels());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, s / reps);
  }
  return flops / best * 1e-9;
}

template <int ROWS, int VECS>
void Row() {
  std::printf("kRows=%2d x %d vectors:", ROWS, VECS);
  for (Index m : {8, 16, 32, 64, 128, 256}) std::printf(" %6.1f", GflopsPerSecond<ROWS, VECS>(m, 256, 1024));
  std::printf("\n");
}

#if TFCELLS_AMX_TILES
// The amx level's step products on tiles (bfloat16 pairs, float32 accumulation), at beta 0 (the
// forward's products) and 1 (the backward's dh carry).
double PairGflopsPerSecond(Index m, Index k, Index n, float beta) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  // A and C on 64-byte boundaries, as TensorFlow's buffers are: the tiles load and store rows of
  // 64 bytes, and one across two cache lines is slow.
  auto aligned = [](Index size) {
    return std::unique_ptr<float[], void (*)(void*)>(
        static_cast<float*>(std::aligned_alloc(64, (size * sizeof(float) + 63) / 64 * 64)),
        &std::free);
  };
  const auto a = aligned(m * k), c = aligned(m * n);
  std::vector<float> w(k * n);
  for (Index i = 0; i < m * k; ++i) a[i] = dist(rng);
  for (float& e : w) e = dist(rng);
  const TilePairOperand packed(false, k, n, w.data(), n, true);
  const double flops = 2.0 * m * k * n;
  const int reps = std::max(1, static_cast<int>(1e9 / flops));
  double best = 1e30;
  for (int trial = 0; trial < 40; ++trial) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r)
      packed.Multiply(m, a.get(), k, beta, c.get(), n, 0, packed.Panels());
    const auto end = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(end - start).count() / reps);
  }
  return flops / best * 1e-9;
}

void PairRows() {
  // Linux hands out the tile state only on request (csrc/core/cpu/cpu_isa.cc does it at load).
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::printf("no AMX tile permission\n");
    return;
  }
  std::printf("bfloat16 pairs on AMX tiles, GFLOP/s, k=256, n=1024, m = 32, 64, 128\n");
  for (float beta : {0.0f, 1.0f}) {
    std::printf("beta=%g:", beta);
    for (Index m : {32, 64, 128}) std::printf(" %7.1f", PairGflopsPerSecond(m, 256, 1024, beta));
    std::printf("\n");
  }
}
#endif

int main() {
#if TFCELLS_AMX_TILES
  PairRows();
#endif
  std::printf("float32 GFLOP/s, k=256, n=1024, m =     8     16     32     64    128    256\n");
  Row<6, 2>();  // the x86-64-v3 level's blocking
  Row<4, 3>();
  Row<3, 4>();
  Row<4, 2>();
  Row<8, 1>();
  Row<12, 1>();
  return 0;
}
