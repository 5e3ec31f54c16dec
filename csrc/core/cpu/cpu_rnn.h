// The CPU entry points of the core: forward and backward of every cell.
#pragma once

#include "../rnn.h"

namespace tfcells {

void ForwardCpu(const ForwardArgs<float>& args);
void ForwardCpu(const ForwardArgs<double>& args);
void BackwardCpu(const BackwardArgs<float>& args);
void BackwardCpu(const BackwardArgs<double>& args);

// Threads OpenBLAS may use for one GEMM (0: its default, one per core).
void SetCpuGemmThreads(int threads);
int CpuGemmThreads();

}  // namespace tfcells
