"""tfcells' benchmark suite: `python -m benchmarks --help` from the repository root,
`python -m tfcells.benchmarks` or the `tfcells-bench` console script anywhere.
`python -m benchmarks --fit`: end-to-end `model.fit` throughput of Embedding + 2-layer LSTM +
Dense on a synthetic text set, Keras' layers vs tfcells', per freeze scenario (fit.py).

Modules: workload (cells, freeze configs, shapes, data), contenders (the implementations, in
one registry), check (values compared before timing), floor (GEMM floor and FLOP model),
timing, runner (one task), fit (the --fit model.fit comparison), gpu (--device gpu: which
suite runs, and tfcells' CUDA kernels through the pybind11 module against cuDNN), torchmap
(Keras weights in PyTorch's layout), machine (threads, machine facts), report (Markdown, JSON,
PNG), cli (the plan and the entry point).
"""
