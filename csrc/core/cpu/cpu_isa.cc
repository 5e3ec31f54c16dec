// Run-time choice of the CPU kernels' ISA level, made once when the library loads: the best
// level of this build (tfcells_cpu_levels.h) that the CPU and the OS support, capped by the
// environment variable TFCELLS_CPU_ISA. Compiled once, for any x86-64 (no ISA flags).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_dispatch.h"
#include "tfcells_cpu_levels.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tfcells {
namespace {

const char* const kLevelNames[] = {
#define TFCELLS_LEVEL_STRING(id, name) name,
    TFCELLS_CPU_LEVELS(TFCELLS_LEVEL_STRING)
#undef TFCELLS_LEVEL_STRING
};
constexpr int kLevelCount = sizeof(kLevelNames) / sizeof(kLevelNames[0]);

#if defined(__x86_64__)
// What the levels need, read from cpuid and XCR0 (the register state the OS saves: a CPU
// feature is unusable when the OS does not save its registers).
struct X86Features {
  bool v3 = false, v4 = false, avx512_bf16 = false, avx512_fp16 = false, amx = false;
  bool intel = false;  // the vendor string is "GenuineIntel"

  X86Features() {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return;
    intel = b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;  // "Genu" "ineI" "ntel"
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const unsigned l1c = c;
    const unsigned max_leaf = __get_cpuid_max(0, nullptr);
    unsigned l7b = 0, l7c = 0, l7d = 0, l71a = 0;
    if (max_leaf >= 7) {
      __cpuid_count(7, 0, a, l7b, l7c, l7d);
      if (a >= 1) __cpuid_count(7, 1, l71a, b, c, d);
    }
    unsigned ext_c = 0;
    if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000001) {
      __cpuid(0x80000001, a, b, ext_c, d);
    }
    auto bit = [](unsigned reg, int i) { return ((reg >> i) & 1) != 0; };
    unsigned long long xcr0 = 0;
    if (bit(l1c, 27)) {  // OSXSAVE: xgetbv is available
      unsigned lo, hi;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    const bool ymm_state = (xcr0 & 0x6) == 0x6;      // XMM, YMM
    const bool zmm_state = (xcr0 & 0xe6) == 0xe6;    // + opmask, ZMM_Hi256, Hi16_ZMM
    const bool tile_state = (xcr0 & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
    // x86-64-v2: SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B; LAHF/SAHF.
    const bool v2 = bit(l1c, 0) && bit(l1c, 9) && bit(l1c, 19) && bit(l1c, 20) &&
                    bit(l1c, 23) && bit(l1c, 13) && bit(ext_c, 0);
    // x86-64-v3: AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE (OSXSAVE).
    v3 = v2 && bit(l1c, 28) && bit(l7b, 5) && bit(l7b, 3) && bit(l7b, 8) && bit(l1c, 29) &&
         bit(l1c, 12) && bit(ext_c, 5) && bit(l1c, 22) && bit(l1c, 27) && ymm_state;
    // x86-64-v4: AVX512F, AVX512BW, AVX512CD, AVX512DQ, AVX512VL.
    v4 = v3 && bit(l7b, 16) && bit(l7b, 30) && bit(l7b, 28) && bit(l7b, 17) && bit(l7b, 31) &&
         zmm_state;
    avx512_bf16 = v4 && bit(l71a, 5);
    avx512_fp16 = v4 && bit(l7d, 23);
    // AMX-TILE and AMX-BF16, their state enabled in XCR0 and offered by the kernel.
    amx = tile_state && bit(l7d, 24) && bit(l7d, 22) && KernelOffersTileData();
  }

  static bool KernelOffersTileData() {
#if defined(__linux__)
    constexpr int kArchGetXcompSupp = 0x1021, kXfeatureXtiledata = 18;
    unsigned long features = 0;
    return syscall(SYS_arch_prctl, kArchGetXcompSupp, &features) == 0 &&
           (features >> kXfeatureXtiledata & 1) != 0;
#else
    return false;
#endif
  }
};

// This machine's features, read once (cpuid in a VM exits to the hypervisor).
const X86Features& Features() {
  static const X86Features f;
  return f;
}

// Linux gives a process AMX tile data only on request (the state is large).
bool RequestTileData() {
#if defined(__linux__)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// Whether `level` runs AMX tile instructions here: the amx level, and a native build on a
// machine with AMX (-march=native turns the tile code on; without Linux' permission its first
// tile instruction dies with SIGILL).
bool RunsTiles(const std::string& level) {
  return level == "amx" || (level == "native" && Features().amx);
}
#endif  // __x86_64__

// What this machine lacks to run `level` ("" when nothing).
std::string Lacks(const std::string& level) {
  if (level == "native" || level == "generic" || level == "x86-64") return "";
#if defined(__x86_64__)
  const X86Features& f = Features();
  if (level == "x86-64-v3")
    return f.v3 ? "" : "AVX2, FMA, F16C, BMI1/2, LZCNT or MOVBE (x86-64-v3), or the OS's YMM state";
  if (!f.v3 || !f.v4) return "AVX-512 F/BW/CD/DQ/VL (x86-64-v4), or the OS's ZMM state";
  if (level == "x86-64-v4") return "";
  if (!f.avx512_bf16) return "AVX512_BF16";
  if (level == "avx512-bf16") return "";
  if (level == "amx")
    return f.avx512_fp16 && f.amx ? ""
                                  : "AVX512_FP16, AMX-TILE or AMX-BF16, or the OS's tile state";
#endif
  return "support for it";
}

std::string Join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::vector<std::string> Runnable() {
  std::vector<std::string> names;
  for (int i = 0; i < kLevelCount; ++i)
    if (Lacks(kLevelNames[i]).empty()) names.push_back(kLevelNames[i]);
  return names;
}

// The level's index, or -1 with `error` saying why none: `cap` (from `source`) names the level
// exactly, since each level includes every one below it; empty picks the best.
int Choose(const std::string& cap, const char* source, std::string* error) {
  const std::string choices = "valid choices: " + Join(CpuIsasBuilt()) +
                              "; this machine runs: " + Join(Runnable());
  for (int i = kLevelCount - 1; i >= 0; --i) {
    const std::string name = kLevelNames[i];
    if (!cap.empty() && cap != name) continue;
    std::string lacks = Lacks(name);
#if defined(__x86_64__)
    if (lacks.empty() && RunsTiles(name) && !RequestTileData())
      lacks = "permission to use AMX tile data (arch_prctl(ARCH_REQ_XCOMP_PERM) refused)";
#endif
    if (lacks.empty()) return i;
    if (!cap.empty()) {
      *error = source + ("=" + cap) + ": this machine lacks " + lacks + " (" + choices + ")";
      return -1;
    }
  }
  *error = cap.empty() ? "no CPU level of this build runs on this machine (" + choices + ")"
                       : source + ("=" + cap) + " is not a CPU level of this build (" + choices +
                             ")";
  return -1;
}

struct Choice {
  std::atomic<int> index{-1};
  std::string error;  // why index is -1

  Choice() {
    const char* cap = std::getenv("TFCELLS_CPU_ISA");
    index = Choose(cap ? cap : "", "TFCELLS_CPU_ISA", &error);
  }
};

Choice& Chosen() {
  static Choice choice;
  return choice;
}
// The choice is made when the library loads, not at the first kernel call.
const bool kChosenAtLoad = (Chosen(), true);

}  // namespace

bool CpuIsIntel() {
#if defined(__x86_64__)
  return Features().intel;
#else
  return false;
#endif
}

// The OS's figure for one of the cache parameters of sysconf (glibc reads them from cpuid), or
// 0 where it gives none.
#if defined(_SC_LEVEL1_DCACHE_ASSOC) && defined(_SC_LEVEL2_CACHE_SIZE)
#define TFCELLS_CACHE_FIGURE(name) std::max(0L, sysconf(name))
#else
#define TFCELLS_CACHE_FIGURE(name) 0L
#endif

Index CpuL2CacheBytes() {
  static const Index bytes = [] {
    const long reported = TFCELLS_CACHE_FIGURE(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? Index(reported) : Index(1) << 20;
  }();
  return bytes;
}

int CpuL1DataWays() {
  static const int ways = int(TFCELLS_CACHE_FIGURE(_SC_LEVEL1_DCACHE_ASSOC));
  return ways;
}

int CpuIsaIndex() {
  const int index = Chosen().index.load(std::memory_order_relaxed);
  if (index < 0) throw std::invalid_argument("tfcells: " + Chosen().error);
  return index;
}

std::string CpuIsa() { return kLevelNames[CpuIsaIndex()]; }

std::vector<std::string> CpuIsas() { return Runnable(); }

std::vector<std::string> CpuIsasBuilt() { return {kLevelNames, kLevelNames + kLevelCount}; }

void SetCpuIsa(const std::string& level) {
  std::string error;
  const int index = Choose(level, "SetCpuIsa", &error);
  if (index < 0) throw std::invalid_argument("tfcells: " + error);
  Chosen().index.store(index, std::memory_order_relaxed);
}

}  // namespace tfcells

// For the TensorFlow op library's loader (ctypes), which must agree with _tfcells_core: the
// chosen level, or "" when TFCELLS_CPU_ISA was invalid (then the error says why).
extern "C" const char* tfcells_cpu_isa() {
  const int index = tfcells::Chosen().index.load(std::memory_order_relaxed);
  return index < 0 ? "" : tfcells::kLevelNames[index];
}
extern "C" const char* tfcells_cpu_isa_error() { return tfcells::Chosen().error.c_str(); }
