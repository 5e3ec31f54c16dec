"""tfcells' benchmark suite: `python -m benchmarks --help` from the repository root,
`python -m tfcells.benchmarks` or the `tfcells-bench` console script anywhere.

Modules: workload (cells, freeze configs, shapes, data), contenders (the implementations, in
one registry), check (values compared before timing), floor (GEMM floor and FLOP model),
timing, runner (one task), machine (threads, machine facts), report (Markdown, JSON, PNG),
cli (the plan and the entry point).
"""
