"""tfcells' benchmark suite: `python -m benchmarks --help`.

Modules: workload (cells, freeze configs, shapes, data), contenders (the implementations, in
one registry), check (values compared before timing), floor (GEMM floor and FLOP model),
timing, runner (one task), machine (threads, machine facts), report (Markdown, JSON, PNG),
cli (the plan and the entry point).
"""
