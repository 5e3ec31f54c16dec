"""Output: Markdown tables, the JSON file and the PNG chart, all from the same records."""

import json
from collections import OrderedDict

from . import contenders, gpu, runner
from .workload import CONFIGS

TIMED = ("ok", "unverified")  # statuses that carry a time
BASELINE_CONFIG = "all_trainable"
SWEEP_DIMS = ("T", "B", "H")


IMPLS = {**contenders.REGISTRY, **gpu.REGISTRY}  # every contender: labels, plot colours


def _label(impl):
    con = IMPLS.get(impl)
    return con.label if con is not None and con.label else impl


def _num(v):
    """A time or ratio with about three significant digits."""
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


# Cores other processes kept busy during a timing block above which its result is marked.
DISTURBED_CORES = 0.25


def _disturbed(cores):
    return cores is not None and cores > DISTURBED_CORES


def _flagged(text, flag):
    return text + " ⚠" if flag else text


def _cell_time(rec, spread=True):
    if rec is None or rec["status"] == "skipped":
        return "—"
    if rec["status"] not in TIMED:
        return rec["status"].upper()  # MISMATCH or ERROR: not timed, see the notes
    text = _num(rec["median_ms"])
    if spread:
        text += f" ±{_num(rec['iqr_ms'] / 2)}"
    if rec["status"] == "unverified":
        text += " ?"
    return _flagged(text, _disturbed(rec.get("other_cores")))


def _floor_time(rec):
    return _flagged(_num(rec["floor_ms"]), _disturbed(rec.get("floor_other_cores")))


def _ratio(a, b):
    return a / b if a is not None and b else None


# Flags (a record's "flags" in the JSON): why one of its numbers is not to be trusted as it
# stands. Each marks the table cells it concerns with ⚠.
FLAGS = {
    "disturbed": "other processes used the cores while this contender was timed",
    "floor_disturbed": "other processes used the cores while the floor was timed",
    "floor_ratio_above_1": "floor ratio above 1: the floor, meant as a lower bound, was slower "
                           "than this contender (contention the measurement missed, or the "
                           "floor's GEMM path slower than the contender's here)",
    "vs_tfcells_disturbed": "÷ tfcells: one of the two times was disturbed",
    "vs_all_trainable_disturbed": "÷ all_trainable: one of the two times was disturbed",
}


def annotate(records):
    """Derived values and their flags, computed once for the tables and the JSON alike:
    vs_tfcells (this time ÷ tfcells' in the same configuration; keras ÷ tfcells in the table),
    vs_all_trainable (÷ the same contender's all-trainable time) with the FLOP model's share,
    and flags (FLAGS) for every number whose inputs carry a ⚠."""
    def key(r, config, impl):
        return (r["cell"], r["dtype"], r["device"], r["T"], r["B"], r["I"], r["H"],
                r.get("sweep"), config, impl)

    by_key = {key(r, r["config"], r["impl"]): r for r in records}
    for r in records:
        if r["status"] not in TIMED:
            continue
        ours, base = (by_key.get(key(r, r["config"], "tfcells")),
                      by_key.get(key(r, BASELINE_CONFIG, r["impl"])))
        hit = _disturbed(r.get("other_cores"))
        flags = ["disturbed"] * hit
        if r.get("floor_ms") and _disturbed(r.get("floor_other_cores")):
            flags.append("floor_disturbed")
        if (r.get("floor_ratio") or 0) > 1:
            flags.append("floor_ratio_above_1")
        r["vs_tfcells"] = _ratio(r["median_ms"], _median(ours))
        if r["vs_tfcells"] is not None and (hit or _disturbed(ours.get("other_cores"))):
            flags.append("vs_tfcells_disturbed")
        r["vs_all_trainable"] = _ratio(r["median_ms"], _median(base))
        r["flops_vs_all_trainable"] = _ratio(r.get("flops"), base and base.get("flops"))
        if r["vs_all_trainable"] is not None and (hit or _disturbed(base.get("other_cores"))):
            flags.append("vs_all_trainable_disturbed")
        r["flags"] = flags
    return records


def _floor_ratio(rec):
    """An impl's floor ratio cell, marked when any of its inputs is, or when it is above 1."""
    if rec is None or rec.get("floor_ratio") is None:
        return "—"
    flags = set(rec.get("flags", ()))
    return _flagged(_num(rec["floor_ratio"]), flags & {"disturbed", "floor_disturbed",
                                                       "floor_ratio_above_1"})


def _has_floor(records):
    """The GEMM floor is measured on the CPU only: GPU tables go without its columns."""
    return any(r.get("floor_ms") for r in records)


def _median(rec):
    return rec["median_ms"] if rec and rec["status"] in TIMED else None


def _vs_all_trainable(by_config, config, impl):
    """impl's time in `config` ÷ its all-trainable time, with the FLOP model's ratio."""
    base, rec = by_config.get(BASELINE_CONFIG, {}).get(impl), by_config[config].get(impl)
    rel = rec.get("vs_all_trainable") if rec else None
    text = "—" if rel is None else _flagged(f"{rel:.2f}",
                                            "vs_all_trainable_disturbed" in rec["flags"])
    if base is not None:
        any_rec = next(iter(by_config[config].values()))
        text += f" ({any_rec['flops'] / base['flops']:.2f})"
    return text


def _vs_tfcells(rec):
    """keras ÷ tfcells (> 1: tfcells is faster)."""
    if rec is None or rec.get("vs_tfcells") is None:
        return "—"
    return _flagged(f"{rec['vs_tfcells']:.2f}×", "vs_tfcells_disturbed" in rec["flags"])


def _groups(records, sweep):
    """Records by (cell, dtype, device, T, B, I, H), then config, then impl, in run order."""
    groups = OrderedDict()
    for r in records:
        if (r.get("sweep") is not None) != sweep:
            continue
        key = (r["cell"], r["dtype"], r["device"], r["T"], r["B"], r["I"], r["H"])
        groups.setdefault(key, OrderedDict()).setdefault(r["config"], OrderedDict())[r["impl"]] = r
    return groups


def _impls(by_config):
    impls = []
    for by_impl in by_config.values():
        for impl, r in by_impl.items():
            if impl not in impls and r["status"] != "skipped":
                impls.append(impl)
    return impls


def _table(rows):
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _main_table(by_config, wide=False):
    """One cell and shape, a row per configuration. Compact: the floor, each contender's
    median, keras ÷ tfcells and tfcells' floor ratio; wide (--wide): also GEMM GFLOP, ± half
    the IQR, tfcells ÷ all_trainable and every contender's floor ratio."""
    impls = _impls(by_config)
    floor = _has_floor(r for by_impl in by_config.values() for r in by_impl.values())
    ratio_impls = impls if wide else [i for i in impls if i == "tfcells"]
    # A 16-bit run: the floor's GEMM dtype in the header where one dtype won everywhere
    # (_floor_line says more).
    recs = [r for by_impl in by_config.values() for r in by_impl.values()]
    floor_dtypes = {r.get("floor_dtype") for r in recs if r.get("floor_ms")}
    floor_dtype = next(iter(floor_dtypes)) if len(floor_dtypes) == 1 else None
    floor_head = ("floor ms" if floor_dtype in (None, recs[0]["dtype"]) else
                  f"floor ms ({floor_dtype} GEMMs)")
    header = (["config"] + ["GEMM GFLOP"] * wide + [floor_head] * floor
              + [f"{_label(i)} ms" for i in impls] + ["keras ÷ tfcells"]
              + ["tfcells ÷ all_trainable (FLOP model)"] * wide
              + [f"floor ratio {_label(i)}" for i in ratio_impls] * floor)
    rows = [header]
    for config, by_impl in by_config.items():
        any_rec = next(iter(by_impl.values()))
        row = [config] + [f"{any_rec['flops'] / 1e9:.3g}"] * wide
        row += [_floor_time(any_rec)] * floor
        row += [_cell_time(by_impl.get(i), spread=wide) for i in impls]
        row += [_vs_tfcells(by_impl.get("keras"))]
        row += [_vs_all_trainable(by_config, config, "tfcells")] * wide
        row += [_floor_ratio(by_impl.get(i)) for i in ratio_impls] * floor
        rows.append(row)
    return _table(rows)


def _floor_line(by_config):
    """Which dtype's GEMMs the floor is where the run timed more than one (a 16-bit run: float32
    ones, what tfcells computes in, and 16-bit ones through tf.matmul), and how they compared."""
    firsts = {c: next(iter(by_impl.values())) for c, by_impl in by_config.items()}
    firsts = {c: r for c, r in firsts.items() if r.get("floor_paths")}
    if not firsts or all(len({p["dtype"] for p in r["floor_paths"].values()}) < 2
                         for r in firsts.values()):
        return ""
    chosen, ratios = {}, {}
    for config, r in firsts.items():
        best = {}
        for path, p in r["floor_paths"].items():
            if p["median_ms"] and (p["dtype"] not in best or p["median_ms"] < best[p["dtype"]]):
                best[p["dtype"]] = p["median_ms"]
        chosen.setdefault(r["floor_dtype"], []).append(config)
        slow = [d for d in best if d != r["floor_dtype"]]
        for d in slow:
            ratios.setdefault(d, []).append(best[d] / best[r["floor_dtype"]])
    parts = [f"{d} GEMMs" + ("" if len(chosen) == 1 else f" in {', '.join(cs)}")
             for d, cs in chosen.items()]
    slower = [f"{d} GEMMs measured {min(v):.2g}" + (f"–{max(v):.2g}" if max(v) > min(v) * 1.05
                                                    else "") + "× slower on this CPU"
              for d, v in ratios.items()]
    return ("Floor: " + "; ".join(parts) + " (the faster per configuration"
            + (": " + "; ".join(slower) if slower else "") + "; 16-bit GEMMs through "
            "TensorFlow's tf.matmul, float32 ones through NumPy's BLAS or tfcells' path; JSON "
            "floor_dtype, floor_paths).")


def _floor_and_memory_lines(by_config):
    return "\n\n".join(line for line in (_floor_line(by_config), _memory_line(by_config))
                        if line)


def _memory_line(by_config):
    """The RSS peaks (memory.py) of the configuration they were measured for, if any."""
    for config, by_impl in by_config.items():
        measured = [(i, r) for i, r in by_impl.items() if "rss_peak_mb" in r or "rss_error" in r]
        if measured:
            parts = [f"{_label(i)} {r['rss_peak_mb']:.0f} MB" if "rss_peak_mb" in r else
                     f"{_label(i)} not measured ({r['rss_error']})" for i, r in measured]
            return (f"Memory, {config} step (RSS peak above the process' baseline, a fresh "
                    "process per contender): " + ", ".join(parts) + ".")
    return ""


def _gpu_table(by_config, peak):
    """The pybind11-vs-cuDNN suite: times, ratios to cuDNN, TFLOP/s (records annotated by
    gpu.annotate)."""
    impls = _impls(by_config)
    ours = gpu.REFERENCE
    peak_text = "" if peak is None else " (% peak)"
    header = (["config", "GEMM GFLOP"] + [f"{_label(i)} ms" for i in impls]
              + [f"{_label(ours)} ÷ cuDNN", f"{_label(ours)} ÷ cuDNN all_trainable",
                 f"{_label(ours)} ÷ all_trainable (FLOP model)"]
              + [f"{_label(i)} TFLOP/s{peak_text}" for i in impls])
    rows = [header]
    for config, by_impl in by_config.items():
        any_rec, rec = next(iter(by_impl.values())), by_impl.get(ours, {})
        row = [config, f"{any_rec['flops'] / 1e9:.3g}"]
        row += [_cell_time(by_impl.get(i)) for i in impls]
        row += [_num(rec.get("vs_cudnn")), _num(rec.get("vs_cudnn_all_trainable")),
                _vs_all_trainable(by_config, config, ours)]
        for i in impls:
            r = by_impl.get(i, {})
            text = _num(r.get("tflops"))
            if r.get("peak_fraction") is not None:
                text += f" ({100 * r['peak_fraction']:.0f} %)"
            row.append(text)
        rows.append(row)
    return _table(rows)


def _notes(records):
    """Every record that was not timed as expected; skips once per (contender, reason)."""
    notes, skips = [], OrderedDict()
    for r in records:
        if r["status"] == "skipped":
            skips.setdefault((r["impl"], r["detail"]), None)
        elif r["status"] != "ok":
            notes.append(f"- {r['cell']} {r['config']} T={r['T']} B={r['B']} I={r['I']} "
                         f"H={r['H']}, {_label(r['impl'])}: **{r['status']}** — {r['detail']}")
    notes += [f"- {_label(impl)} skipped: {reason}" for impl, reason in skips]
    return notes


def _sweep_tables(records, wide=True):
    """--full: for each cell, config and swept dimension, time against the dimension (compact
    unless wide: no GEMM GFLOP or spread, tfcells' floor ratio only)."""
    out = []
    for dim in SWEEP_DIMS:
        points = [r for r in records if r.get("sweep") == dim]
        keys = OrderedDict(((r["cell"], r["config"], r["dtype"]), None) for r in points)
        for cell, config, dtype in keys:
            sel = [r for r in points if (r["cell"], r["config"], r["dtype"])
                   == (cell, config, dtype)]
            others = [d for d in SWEEP_DIMS if d != dim]
            ref = sel[0]
            by_value = OrderedDict()
            for r in sorted(sel, key=lambda r: r[dim]):
                by_value.setdefault(r[dim], OrderedDict())[r["impl"]] = r
            impls = _impls(by_value)
            floor = _has_floor(sel)
            fixed = ", ".join(f"{d}={ref[d]}" for d in others) + \
                (f", I={ref['I']}" if dim != "H" else ", I=H")
            out.append(f"\n### {cell} {config}: time against {dim} ({fixed}, {dtype})\n")
            ratio_impls = impls if wide else [i for i in impls if i == "tfcells"]
            rows = [[dim] + ["GEMM GFLOP"] * wide + ["floor ms"] * floor
                    + [f"{_label(i)} ms" for i in impls]
                    + [f"floor ratio {_label(i)}" for i in ratio_impls] * floor]
            for value, by_impl in by_value.items():
                any_rec = next(iter(by_impl.values()))
                rows.append([str(value)] + [f"{any_rec['flops'] / 1e9:.3g}"] * wide
                            + [_floor_time(any_rec)] * floor
                            + [_cell_time(by_impl.get(i), spread=wide) for i in impls]
                            + [_floor_ratio(by_impl.get(i)) for i in ratio_impls] * floor)
            out.append(_table(rows))
            growth = _growth(by_value, impls)
            if growth:
                out.append("\n" + growth)
    return out


def _growth(by_value, impls):
    values = list(by_value)
    if len(values) < 2:
        return ""
    lo, hi = by_value[values[0]], by_value[values[-1]]
    flops = _ratio(next(iter(hi.values()))["flops"], next(iter(lo.values()))["flops"])
    parts = [f"GEMM FLOPs ×{flops:.2f}"]
    for i in impls:
        a, b = lo.get(i), hi.get(i)
        if a and b and a["status"] in TIMED and b["status"] in TIMED:
            parts.append(f"{_label(i)} ×{b['median_ms'] / a['median_ms']:.2f}")
    return f"Growth from {values[0]} to {values[-1]}: " + ", ".join(parts) + "."


def _load(values):
    return f"{values[0]:.2f}" if values else "—"


def _reps_text(records, settings):
    per_block = runner.block_reps(settings["reps"])
    done = [r["reps"] for r in records if r.get("reps")]
    if not done or min(done) == max(done) == per_block:
        counted = f"{per_block} repetitions"
    else:
        span = f"{min(done)}" if min(done) == max(done) else f"{min(done)}–{max(done)}"
        counted = (f"{span} repetitions (up to {per_block}, fewer once a block passed "
                   f"{settings['budget_s']:g} s)")
    return (f"After a checked first call, two blocks per contender (the second round in "
            f"reverse order), each {settings['warmup']} warm-up and {counted} (--reps "
            f"{settings['reps']}); the faster block's median counts (JSON: block_medians_ms)")


def _busy(records, m):
    """Other work on the machine skews the numbers; say so where the numbers are."""
    # The floor once per task (every record of the task repeats it).
    floors = {(r["cell"], r["config"], r["dtype"], r["T"], r["B"], r["I"], r["H"],
               r.get("sweep")): r.get("floor_other_cores") for r in records}
    blocks = [r.get("other_cores") for r in records] + list(floors.values())
    hit = [c for c in blocks if _disturbed(c)]
    above = sum("floor_ratio_above_1" in r.get("flags", ()) for r in records)
    out = []
    if hit:
        out.append(f"other processes kept up to {max(hit):.1f} of {m['logical_cores']} cores "
                   f"busy during {len(hit)} timing blocks (marked ⚠, more than "
                   f"{DISTURBED_CORES:g} core on average). Those numbers are skewed, "
                   "multi-threaded BLAS-based steps (the floor, tfcells, PyTorch) most; rerun "
                   "on an idle machine.")
    if above:
        out.append(f"{above} floor ratios are above 1 (marked ⚠): there the floor, meant as a "
                   "lower bound, was slower than the contender, so one of the two blocks ran "
                   "under contention the measurement missed (a short block gets its task's "
                   "average) or the floor's GEMMs ran slower than the contender's; rerun.")
    return " ".join(out)


def _build_text(m):
    """Whether tfcells has CUDA kernels and whether they can run here (build_info)."""
    b = m.get("tfcells_build") or {}
    if "cuda" not in b:
        return ""
    if not b["cuda"]:
        return "tfcells built without CUDA kernels."
    if b.get("gpu_kernels_usable"):
        return "tfcells' CUDA kernels are built and usable here."
    why = b.get("gpu_kernels_reason")
    return "tfcells' CUDA kernels are built but cannot run here" + (f" ({why})." if why
                                                                     else ".")


def markdown(records, meta, wide=False):
    m = meta["machine"]
    th = m["threads"]
    out = [f"# tfcells benchmark — {m['date']}", "",
           f"{m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; "
           f"TensorFlow {m['versions']['tensorflow']}, Keras {m['versions']['keras']}, "
           f"tfcells {m['versions']['tfcells']}, NumPy {m['versions']['numpy']} "
           f"(OpenBLAS {m['numpy_blas']}), PyTorch {m['versions']['torch'] or 'not installed'}. "
           + _build_text(m),
           "Threads: TF intra-op {tf_intra_op} / inter-op {tf_inter_op}, tfcells GEMM "
           "{tfcells_gemm} (0: the library's default, one per core), NumPy BLAS {numpy_blas}, "
           "PyTorch {torch}. "
           "1-minute load average at start {load0}, at the end {load1}.".format(
               load0=_load(m.get("load_average")), load1=_load(m.get("load_average_end")),
               torch=th.get("torch", "—"), **{k: v for k, v in th.items() if k != "torch"}),
           f"One training step = forward + backward (tf.GradientTape in tf.function) of "
           f"sum(outputs·dy) w.r.t. what the configuration leaves trainable, the tape given dy "
           f"as output_gradients (as PyTorch's grad_outputs); inference = "
           f"forward only. {_reps_text(records, meta['settings'])}; wall time "
           f"{meta['wall_s']:.0f} s."]
    if meta["settings"]["device"] == "gpu":
        out.append(f"On TensorFlow's GPU: each step waits for the device (sync_devices, "
                   f"torch.cuda.synchronize) before the clock stops; TF32 in effect: "
                   f"{meta['settings']['tf32']}; no GEMM floor (it is measured on the CPU).")
    out += _sections(records, m, lambda by_config: _main_table(by_config, wide),
                     _floor_and_memory_lines, wide)
    memory = meta["settings"].get("memory") or {}
    out += ["", ("Times are medians in ms, ± half the interquartile range. " if wide else
                 "Times are medians in ms (--wide: ± half the interquartile range, GEMM "
                 "GFLOP, tfcells ÷ all_trainable and every contender's floor ratio; the JSON "
                 "has them all). ")
            + "floor = the step's "
            "GEMMs alone (same shapes) on this machine, through NumPy's BLAS or tfcells' own "
            "GEMM path, whichever was faster (each timed in its own block; JSON: floor_path); "
            "floor ratio = floor ÷ median (1.0: all time spent in GEMMs at the best GEMM rate). "
            "keras ÷ tfcells > 1: tfcells is faster. "
            + ("tfcells ÷ all_trainable: time relative to tfcells' all-trainable step, with "
               "the GEMM FLOP model's ratio in parentheses. " if wide else "")
            + "MISMATCH: values differ from the reference, so not timed; ?: no other "
            "contender confirmed the values; ⚠: other processes used the cores while this (or, "
            "on a ratio, one of its inputs) was timed (measured per block; a block shorter than "
            "0.5 s gets the average over its task's timing), or a floor ratio is above 1 (JSON: "
            "flags)."
            + (" Memory: " + memory["method"] + " (baseline: the frameworks imported and "
               "started, the data made; the peak includes the weights, the traced graph and "
               "what the framework keeps between steps). Also in the JSON: rss_peak_mb; "
               "peak_mem_mb is TensorFlow's allocator peak, which misses buffers outside it "
               "(e.g. Keras' while loop)." if memory.get("method") else "")]
    return "\n".join(out + _notes_section(records)) + "\n"


def _sections(records, machine, table, after=None, wide=True):
    """The busy warning, then one table per (cell, shape) (with `after`'s line below it, if
    any) and the sweeps."""
    out = []
    busy = _busy(records, machine)
    if busy:
        out += ["", f"**Warning: {busy}**"]
    for (cell, dtype, device, T, B, I, H), by_config in _groups(records, sweep=False).items():
        out += ["", f"## {cell}: T={T} B={B} I={I} H={H}, {dtype}, {device}", "",
                table(by_config)]
        line = after(by_config) if after else ""
        if line:
            out += ["", line]
    sweeps = _sweep_tables(records, wide)
    if sweeps:
        out += ["", "## Scaling (--full sweeps)"] + sweeps
    return out


def _notes_section(records):
    notes = _notes(records)
    return ["", "Notes:"] + notes if notes else []


def gpu_markdown(records, meta):
    """--device gpu without a GPU TensorFlow: tfcells' CUDA kernels against cuDNN."""
    m, g, st = meta["machine"], meta["gpu"], meta["settings"]
    peak = (f"{g['peak_tflops']:g} TFLOP/s ({g['peak_source']})" if g["peak_tflops"] else
            "unknown for this GPU and dtype")
    out = [f"# tfcells GPU benchmark: CUDA kernels vs cuDNN — {m['date']}", "",
           f"{g['name']}; CUDA {g['cuda']}, cuDNN {g['cudnn']}, PyTorch {g['torch']}, cuBLAS "
           f"{g['cublas']}; tfcells {m['versions']['tfcells']}; host {m['cpu']}, "
           f"{m['logical_cores']} logical cores.",
           f"{st['dtype']}, TF32 {'ON' if g['tf32'] else 'OFF'} for both; nominal dense peak "
           f"{peak}.",
           "One training step = tfcells' CUDA forward (keeping the training cache) and its "
           "backward with the configuration's gradient mask, through tfcells._tfcells_cuda on "
           "PyTorch CUDA tensors; against torch.nn.LSTM/GRU/RNN (cuDNN) forward and "
           "torch.autograd.grad of sum(y·dy) w.r.t. what the configuration leaves trainable. "
           "Same weights, x and dy, zero initial states; y, the final states and every "
           f"gradient both compute agree within {st['tolerance']:g} of the largest magnitude "
           f"before either is timed. {_reps_text(records, st)}, each repetition between CUDA "
           f"events; wall time {meta['wall_s']:.0f} s."]
    out += _sections(records, m, lambda by_config: _gpu_table(by_config, g["peak_tflops"]))
    out += ["", "Times are medians in ms on CUDA events, ± half the interquartile range. "
            "÷ cuDNN: tfcells' time ÷ cuDNN's in the same configuration (< 1: tfcells is "
            "faster); ÷ cuDNN all_trainable: ÷ cuDNN's all-trainable step of the same shape. "
            "TFLOP/s: the GEMM FLOP model ÷ median (pointwise work not counted). Targets "
            "(issue 6): all-trainable ratio ≤ 1.25; every frozen configuration's ÷ cuDNN "
            "all_trainable < 1. MISMATCH: values differ from the reference, so not timed; ?: "
            "no other contender confirmed the values."]
    return "\n".join(out + _notes_section(records)) + "\n"


def _fit_rate(rec):
    if rec is None:
        return "—"
    if rec["status"] not in TIMED or rec.get("samples_per_s") is None:
        return rec["status"].upper()  # MISMATCH or ERROR: not timed, see the notes
    text = f"{rec['samples_per_s']:.0f}"
    return text + " ⚠" if _disturbed(rec.get("other_cores")) else text


def _fit_loss_check(keras, tfc):
    if keras is None or tfc is None or "check" not in tfc:
        return "—"
    rel = tfc["check"]["loss_rel_diff"]
    ok = "MISMATCH" if "loss" in tfc["detail"] and tfc["status"] == "mismatch" else "ok"
    return (f"{ok}: {keras['loss_warmup']:.4f} vs {tfc['loss_warmup']:.4f} "
            f"(rel. diff {rel:.1e})")


def _fit_frozen(by_impl, scenario):
    if any(r.get("frozen", "").startswith("nothing frozen") for r in by_impl.values()):
        return "— (none frozen)"
    flags = [r.get("frozen_bit_identical") for r in by_impl.values()]
    if not flags or any(f is None for f in flags):
        return "—"
    return "bit-identical" if all(flags) else "CHANGED"


def fit_markdown(records, meta):
    """--fit: one table, scenario by scenario, Keras' layers against tfcells'."""
    m = meta["machine"]
    size = meta["settings"]["fit"]
    th = m["threads"]
    out = [f"# tfcells model.fit benchmark — {m['date']}", "",
           f"{m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; "
           f"TensorFlow {m['versions']['tensorflow']}, Keras {m['versions']['keras']}, "
           f"tfcells {m['versions']['tfcells']}. Threads: TF intra-op {th['tf_intra_op']} / "
           f"inter-op {th['tf_inter_op']}, tfcells GEMM {th['tfcells_gemm']} (0: one per "
           f"core). 1-minute load average at start {_load(m.get('load_average'))}, at the "
           f"end {_load(m.get('load_average_end'))}.",
           f"Model: Embedding({size['vocab']}, {size['embed']}, mask_zero=True) → "
           f"LSTM({size['units']}, return_sequences=True) → LSTM({size['units']}) → "
           f"Dense(1, sigmoid); Adam, binary cross-entropy, jit_compile=False. Data: "
           f"{size['samples']} synthetic sequences of length {size['seq_len']} (about half "
           f"padded), batch {size['batch']}, shuffle=False. One untimed warm-up epoch "
           f"(tracing), then {size['epochs']} timed epochs; wall time {meta['wall_s']:.0f} s."]
    busy = _busy(records, m)
    if busy:
        out += ["", f"**Warning: {busy}**"]
    by_scenario = OrderedDict()
    for r in records:
        by_scenario.setdefault(r["config"], OrderedDict())[r["impl"]] = r
    rows = [["scenario", "keras samples/s", "tfcells samples/s", "speed-up (tfcells ÷ keras)",
             "loss check (warm-up epoch, keras vs tfcells)", "frozen weights after fit",
             "loss last epoch (keras / tfcells)"]]
    for scenario, by_impl in by_scenario.items():
        keras, tfc = by_impl.get("keras"), by_impl.get("tfcells")
        k = keras.get("samples_per_s") if keras and keras["status"] in TIMED else None
        t = tfc.get("samples_per_s") if tfc and tfc["status"] in TIMED else None
        speedup = _ratio(t, k)
        last = [r.get("loss_last") if r else None for r in (keras, tfc)]
        rows.append([scenario, _fit_rate(keras), _fit_rate(tfc),
                     "—" if speedup is None else f"{speedup:.2f}×",
                     _fit_loss_check(keras, tfc), _fit_frozen(by_impl, scenario),
                     " / ".join("—" if v is None else f"{v:.4f}" for v in last)])
    out += ["", _table(rows), "",
            "samples/s: median over the timed epochs of samples ÷ epoch wall time. "
            "speed-up > 1: tfcells is faster. Loss check: mean loss of the warm-up epoch "
            "(same initial weights, same batches), relative difference against Keras; "
            f"MISMATCH above {meta['settings']['fit']['loss_rtol']:g} (then not timed). "
            "Frozen weights: every weight the scenario freezes equals its initial value bit "
            "for bit after the warm-up and after the timed epochs, in both models. "
            "⚠: other processes used the cores while this was timed.", "", "Scenarios:"]
    seen = OrderedDict()
    for r in records:
        seen.setdefault(r["config"], r.get("frozen", ""))
    out += [f"- {name}: {what}" for name, what in seen.items()]
    notes = [f"- {r['config']}, {r['impl']}: **{r['status']}** — {r['detail']}"
             for r in records if r["status"] != "ok"]
    notes += [f"- {r['config']}, tfcells ran Keras' loop: {r['fused_fallback']}"
              for r in records if r.get("fused_fallback")]
    if notes:
        out += ["", "Notes:"] + notes
    return "\n".join(out) + "\n"


def write_json(path, records, meta):
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)


def _color(impl, colors):
    """One colour per contender across all panels."""
    return colors[list(IMPLS).index(impl) % len(colors)] if impl in IMPLS else "black"


def plot(path, records, meta):
    """Writes the PNG; False when there was nothing to draw (then no file is written)."""
    import matplotlib  # lazily: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records, sweep=False)
    sweep_cells = list(OrderedDict.fromkeys(r["cell"] for r in records if r.get("sweep")))
    nrows = len(groups) + len(sweep_cells)
    if nrows == 0:
        return False  # nothing timed: no file
    fig = plt.figure(figsize=(13, 4.2 * nrows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, ((cell, dtype, device, T, B, I, H), by_config) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, 3, (3 * row + 1, 3 * row + 3))
        configs = [c for c in CONFIGS if c in by_config]
        impls = _impls(by_config)
        floor_recs = [next(iter(by_config[c].values())) for c in configs]
        series = [("GEMM floor", None, [
            (r["floor_ms"], None) if r["floor_ms"] else None for r in floor_recs])] \
            if _has_floor(floor_recs) else []
        for impl in impls:
            recs = [by_config[c].get(impl) for c in configs]
            series.append((_label(impl), impl, [
                (r["median_ms"], (r["median_ms"] - r["q1_ms"], r["q3_ms"] - r["median_ms"]))
                if r and r["status"] in TIMED else None for r in recs]))
        width = 0.8 / len(series)
        for k, (name, impl, values) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(configs))]
            heights = [v[0] if v else 0 for v in values]
            errs = [[v[1][j] if v and v[1] else 0 for v in values] for j in (0, 1)]
            # The floor hatched grey.
            style = dict(color="lightgray", hatch="//", edgecolor="gray") if impl is None else \
                dict(color=_color(impl, colors), yerr=errs, capsize=2)
            ax.bar(xs, heights, width, label=name, **style)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=15, fontsize=8)
        ax.set_ylabel("ms (median, IQR bars)")
        ax.set_title(f"{cell}: T={T} B={B} I={I} H={H}, {dtype}, {device}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for i, cell in enumerate(sweep_cells):
        row = len(groups) + i
        for j, dim in enumerate(SWEEP_DIMS):
            ax = fig.add_subplot(nrows, 3, 3 * row + j + 1)
            pts = [r for r in records if r.get("sweep") == dim and r["cell"] == cell
                   and r["status"] in TIMED]
            for impl in OrderedDict.fromkeys(r["impl"] for r in pts):
                sel = sorted((r for r in pts if r["impl"] == impl), key=lambda r: r[dim])
                ax.plot([r[dim] for r in sel], [r["median_ms"] for r in sel], "o-",
                        label=_label(impl), color=_color(impl, colors))
            floor_pts = sorted({r[dim]: r["floor_ms"] for r in pts if r["floor_ms"]}.items())
            if floor_pts:
                ax.plot(*zip(*floor_pts), "k--", label="GEMM floor")
            ax.set_xscale("log", base=2)  # log-log: a line of slope 1 is linear growth
            ax.set_yscale("log")
            ax.set_xlabel(dim + (" (= I)" if dim == "H" else ""))
            ax.set_ylabel("ms")
            ax.set_title(f"{cell} {pts[0]['config'] if pts else ''}: scaling in {dim}",
                         fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    where = meta["gpu"]["name"] if meta.get("gpu", {}).get("name") else meta["machine"]["cpu"]
    fig.suptitle(f"tfcells benchmark, {where}, {meta['machine']['date']}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
