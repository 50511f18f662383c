"""Measure normalization layers: forward+backward time and saved memory, as ratios to torch.

The library behind ``benchmarks/run.py`` and the book's performance appendix. For each layer and
shape it times one forward plus backward pass of

- ``native``: torch's own op (``F.batch_norm``, ``F.layer_norm``; batch renorm has no torch op, so
  its baseline is torch's batch norm on the same shape: a fused renorm does the same memory
  traffic up to two clips),
- ``function``: normcourse's ``torch.autograd.Function`` with the closed-form backward,
- ``autograd``: the plain composition of torch operations, differentiated by autograd,
- ``compiled``: the closed-form Function under ``torch.compile`` (inductor),

and records the median time, the ratio to ``native``, and the memory that the forward pass keeps
for the backward pass (bytes of the tensors autograd saves, counted with saved-tensor hooks: exact
and repeatable, unlike a process's resident memory). On CUDA it also records peak allocated memory.

For the normalization layers (memory-bound: see ``minimum_traffic_bytes``) it also times a torch
copy that moves the same number of bytes as one forward+backward pass must at least move, and
reports each variant's ``copy_fraction``: the copy's time over the variant's, which is the variant's
achieved bandwidth (minimum bytes / its time) as a fraction of the copy's. 1.0 is the memory-bound
limit. The same code runs on any device: ``benchmark_devices()`` adds CUDA when a GPU is present.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from itertools import product

import torch
import torch.nn.functional as tF

from normcourse import functional as ncF
from normcourse.progress import sweep, write

# The layers measured, in the order of the report (chapter 8's from LAYERS_WITHOUT_BATCH).
LAYERS = ("batch_norm", "layer_norm", "batch_renorm",
          "group_norm", "instance_norm", "rms_norm", "ws_conv")
LAYERS_WITHOUT_BATCH = ("group_norm", "instance_norm", "rms_norm", "ws_conv")
# The layers whose least memory traffic is minimum_traffic_bytes: all but the convolution.
MEMORY_BOUND = tuple(layer for layer in LAYERS if layer != "ws_conv")

# (name, shape): (N, C) for fully connected layers, (N, C, H, W) for conv layers.
SHAPES = [
    ("fc 256x512", (256, 512)),
    ("fc 4096x256", (4096, 256)),
    ("conv 32x64x16x16", (32, 64, 16, 16)),
    ("conv 8x32x56x56", (8, 32, 56, 56)),
]


def _channel_args(shape, device):
    c = shape[1]
    weight = torch.rand(c, device=device) + 0.5
    bias = torch.randn(c, device=device)
    return weight.requires_grad_(), bias.requires_grad_()


def make_cases(layer: str, shape, device):
    """Return {variant: closure running one forward+backward}, and the input tensors."""
    if layer in LAYERS_WITHOUT_BATCH:
        return make_cases_without_batch(layer, shape, device)
    x = torch.randn(shape, device=device).requires_grad_()
    dy = torch.randn(shape, device=device)
    if layer == "layer_norm":
        normalized = shape[1:]
        weight = (torch.rand(normalized, device=device) + 0.5).requires_grad_()
        bias = torch.randn(normalized, device=device).requires_grad_()
        native = lambda: tF.layer_norm(x, normalized, weight, bias, 1e-5)
        ours = lambda: ncF.layer_norm(x, normalized, weight, bias, 1e-5)
        composed = lambda: ncF.layer_norm_autograd(x, normalized, weight, bias, 1e-5)
    else:
        weight, bias = _channel_args(shape, device)
        c = shape[1]
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        native = lambda: tF.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
        if layer == "batch_norm":
            ours = lambda: ncF.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
            composed = lambda: ncF.batch_norm_autograd(x, rm, rv, weight, bias, True, 0.1, 1e-5)
        else:
            # running_std away from the batch std so that r and d are not trivially 1 and 0
            rs = torch.full((c,), 0.8, device=device)
            ours = lambda: ncF.batch_renorm(x, rm, rs, weight, bias, True, 3.0, 5.0, 0.01, 1e-5)
            composed = lambda: ncF.batch_renorm_autograd(x, rm, rs, weight, bias, True, 3.0, 5.0, 0.01, 1e-5)
    return timed_variants((x, weight, bias), dy, native, ours, composed)


def timed_variants(params, dy, native, ours, composed):
    """``({variant: run}, ours, step)``: each variant as a zero-argument forward + backward run
    (gradients of ``params`` reset first, ``dy`` the upstream gradient), and the wrapper ``step``
    that makes such a run of any forward (the compiled one)."""
    params = [p for p in params if p is not None]

    def step(fn):
        def run():
            for p in params:
                p.grad = None
            fn().backward(dy)
        return run

    return {"native": step(native), "function": step(ours), "autograd": step(composed)}, ours, step


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd saves for backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def calls_per_block(run, min_time: float, clock=time.process_time, sync=lambda: None) -> int:
    """Warm ``run`` up (three calls: first-call costs, caches, the allocator's heap), then count
    the calls that fill ``min_time`` seconds of ``clock``: the size of one timed block."""
    for _ in range(3):
        run()
    sync()
    calls, t0 = 0, clock()
    while clock() - t0 < min_time:
        run()
        calls += 1
    sync()
    return calls


def median_time(run, device, repeats: int, min_time: float) -> float:
    """Median seconds per call over ``repeats`` timed blocks of enough calls to last ``min_time``.

    On a CPU the clock is the process's CPU time (``time.process_time``): on a machine shared with
    other work, the time spent waiting for a free core is not counted, whereas wall-clock time
    would add it at random. On CUDA it is wall-clock time between synchronisations.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time
    calls = calls_per_block(run, min_time, clock, sync)
    samples = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        for _ in range(calls):
            run()
        sync()
        samples.append((clock() - t0) / calls)
    return statistics.median(samples)


def copy_seconds(nbytes: int, device, repeats: int = 7, min_time: float = 0.2) -> float:
    """Median time of ``dst.copy_(src)`` moving ``nbytes`` in all: half read, half written."""
    src = torch.randn(max(1, nbytes // 8), device=device)  # float32: 4 bytes read, 4 written
    dst = torch.empty_like(src)
    return median_time(lambda: dst.copy_(src), device, repeats, min_time)


def benchmark_devices(requested=None) -> tuple[list[str], str]:
    """The devices to measure and a sentence saying which: ``requested``, else the CPU and CUDA
    when a GPU is present. A request for CUDA without a GPU raises ``ValueError``."""
    available = torch.cuda.is_available()
    if requested and "cuda" in requested and not available:
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() "
                         "is False)")
    if requested:
        return list(requested), f"devices requested: {', '.join(requested)}"
    if available:
        return ["cpu", "cuda"], f"CUDA device found ({torch.cuda.get_device_name()}): CPU and CUDA"
    return ["cpu"], "no CUDA device found: CPU only (on a GPU machine the same run adds CUDA)"


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(device) -> float:
    """Bytes per second of a large tensor copy (read + write): the ceiling a memory-bound op meets."""
    src = torch.randn(32 * 1024 * 1024 // 4 * 8, device=device)  # 32 MiB x 8 = 256 MiB
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats=5, min_time=0.2)
    return 2 * src.numel() * src.element_size() / t


def variant_runs(layer: str, shape, device, compile_backend: str | None = "inductor"):
    """``{variant: run}`` for one layer and shape (``make_cases``), plus ``compiled``: the
    Function under a fresh ``torch.compile(backend=compile_backend)`` (None: no compiled run)."""
    torch.manual_seed(0)
    cases, ours, step = make_cases(layer, shape, device)
    if compile_backend is not None:
        torch._dynamo.reset()  # a fresh compilation for every case, no recompile limits
        cases["compiled"] = step(torch.compile(ours, dynamic=False, backend=compile_backend))
    return cases


def run_benchmarks(device, quick: bool, log=write, compile: bool | None = None, compile_backend: str = "inductor",
                   layers=None):
    """One row per (layer, shape) of ``layers`` (default ``LAYERS``) x ``SHAPES``: each variant's
    time, ratio to native, saved bytes; ``log`` gets each row as a line (default: printed above
    the progress bar).

    ``quick``: fewer and shorter timed blocks. ``compile`` (default: ``not quick``) adds the
    ``compiled`` variant, built with ``torch.compile(backend=compile_backend)``.
    """
    results = []
    repeats, min_time = (3, 0.01) if quick else (7, 0.2)
    compile = not quick if compile is None else compile
    layers = LAYERS if layers is None else layers
    settings = [(layer, shape) for layer, shape in product(layers, SHAPES) if applies(layer, shape[1])]
    settings = sweep(settings, f"benchmark {device}", lambda s: f"{s[0]} {s[1][0]}")
    for layer, (shape_name, shape) in settings:
        cases = variant_runs(layer, shape, device, compile_backend if compile else None)
        row = {"layer": layer, "shape": shape_name, "elements": math.prod(shape)}
        if layer in MEMORY_BOUND:
            row["copy_seconds"] = copy_seconds(minimum_traffic_bytes(row["elements"]), device,
                                               repeats, min_time)
        for variant, run in cases.items():
            t = median_time(run, device, repeats, min_time)
            entry = {"seconds": t, "saved_bytes": saved_bytes(run)}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                run()
                entry["peak_bytes"] = torch.cuda.max_memory_allocated()
            row[variant] = entry
        for variant in cases:
            row[variant]["ratio"] = row[variant]["seconds"] / row["native"]["seconds"]
            if "copy_seconds" in row:
                row[variant]["copy_fraction"] = row["copy_seconds"] / row[variant]["seconds"]
        results.append(row)
        log(format_row(row))
    return results


def format_row(row) -> str:
    parts = [f"{row['layer']:<13} {row['shape']:<18}"]
    for variant in ("native", "function", "autograd", "compiled"):
        if variant in row:
            e = row[variant]
            parts.append(f"{variant} {e['seconds'] * 1e3:7.3f} ms x{e['ratio']:4.2f} {e['saved_bytes'] / 2**20:6.2f} MiB")
    return " | ".join(parts)


def markdown_table(results) -> str:
    """Times (x native), saved MiB and, where measured, the fraction of copy bandwidth."""
    variants = [v for v in ("native", "function", "autograd", "compiled") if v in results[0]]
    bandwidth = [v for v in variants if v != "autograd"] if any(
        "copy_seconds" in r for r in results) else []
    head = "| layer | shape | " + " | ".join(f"{v} ms (x native)" for v in variants)
    head += " | " + " | ".join(f"{v} saved MiB" for v in variants)
    head += "".join(f" | {v} / copy bandwidth" for v in bandwidth) + " |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(variants) + len(bandwidth))]
    for r in results:
        times = " | ".join(f"{r[v]['seconds'] * 1e3:.3f} ({r[v]['ratio']:.2f}x)" for v in variants)
        mems = " | ".join(f"{r[v]['saved_bytes'] / 2**20:.2f}" for v in variants)
        fractions = "".join(f" | {r[v]['copy_fraction']:.2f}" if "copy_fraction" in r[v]
                            else " | -" for v in bandwidth)
        lines.append(f"| {r['layer']} | {r['shape']} | {times} | {mems}{fractions} |")
    return "\n".join(lines) + "\n"


# The smallest input of a fixed cost measurement: a call with (almost) no data to move.
FLOOR_SHAPE = (2, 4)


def fixed_cost_per_call(device, layers=("batch_norm", "layer_norm"), shape=(256, 512),
                        rounds: int = 21, quick: bool = False, compile_backend: str = "inductor"):
    """Each variant's time per call on a ``FLOOR_SHAPE`` input next to its time on ``shape``.

    On the tiny input the time is the fixed cost of a call, whatever the data: Python, dispatch,
    autograd's bookkeeping and, compiled, the guard check and the wrappers around the generated
    code. Measured side by side: short timed blocks of every variant on both shapes take turns,
    ``rounds`` times, and each time is the fastest round's. (A busy or shared machine only ever
    adds time, in bursts longer than one block, so the fastest round is the closest to the cost
    itself.) Returns one row per layer, ``{"layer", "shape", "variants": {variant:
    {"floor_seconds", "seconds"}}}``.
    """
    min_time = 0.01 if quick else 0.05
    rows = []
    for layer in layers:
        runs = {}
        for key, size in (("floor_seconds", FLOOR_SHAPE), ("seconds", shape)):
            for variant, run in variant_runs(layer, size, device, compile_backend).items():
                if variant != "autograd":
                    runs[variant, key] = run
        samples = {k: [] for k in runs}
        for _ in range(rounds):
            for k, run in runs.items():
                samples[k].append(median_time(run, device, 1, min_time))
        variants = {}
        for (variant, key), times in samples.items():
            variants.setdefault(variant, {})[key] = min(times)
        rows.append({"layer": layer, "shape": "x".join(map(str, shape)), "variants": variants})
    return rows


def format_fixed_cost(rows) -> str:
    """``fixed_cost_per_call``'s rows as aligned text: each variant's time on the tiny input,
    on the measured shape, and the difference (the part that grows with the data), in us."""
    floor = "x".join(map(str, FLOOR_SHAPE)) + " (fixed)"
    lines = [f"{'layer':<11} {'shape':<8} {'variant':<9} {floor:>11} {'shape':>8} "
             f"{'shape - fixed':>13}   (microseconds per forward+backward)"]
    for r in rows:
        for variant, t in r["variants"].items():
            fixed, whole = t["floor_seconds"] * 1e6, t["seconds"] * 1e6
            lines.append(f"{r['layer']:<11} {r['shape']:<8} {variant:<9} {fixed:11.0f} "
                         f"{whole:8.0f} {whole - fixed:13.0f}")
    return "\n".join(lines) + "\n"


def minimum_traffic_bytes(elements: int, itemsize: int = 4) -> int:
    """Fewest bytes one forward+backward pass must move between memory and the cores.

    Forward reads x and writes y; backward reads dy and x (or a saved xhat) and writes dx: five
    tensor-sized transfers. The per-channel statistics and parameters are negligible next to them.
    """
    return 5 * elements * itemsize


def plot_ratios(results, title: str):
    """Bar chart of each variant's time relative to torch's native op; returns the figure."""
    import matplotlib.pyplot as plt

    variants = [v for v in ("function", "autograd", "compiled") if v in results[0]]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['layer'].replace('_', ' ')}\n{r['shape']}" for r in results]
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ax.bar([j + i * width for j in range(len(results))], [r[v]["ratio"] for r in results], width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(results))], labels, fontsize=7,
                  rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel("time / torch native (lower is better)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Chapter 8: normalization without the batch
# --------------------------------------------------------------------------------------------
def applies(layer: str, shape) -> bool:
    """Instance norm and the standardized convolution need spatial axes; the rest take any shape."""
    return len(shape) > 2 or layer not in ("instance_norm", "ws_conv")


def benchmark_groups(channels: int) -> int:
    """The group count of the group-norm rows: 8 groups where C allows (32 in Wu & He's ResNets,
    whose layers have 64 or more channels), else the largest divisor of C below 8."""
    return math.gcd(channels, 8)


def make_cases_without_batch(layer: str, shape, device):
    """``make_cases`` for group norm, instance norm, RMSNorm and the weight-standardized conv.

    Baselines: torch's ``F.group_norm``, ``F.instance_norm``, ``F.rms_norm`` (RMSNorm over the
    trailing ``shape[1:]`` axes, as the layer-norm rows), and for ``ws_conv`` the plain 3x3
    convolution ``F.conv2d`` with the same (C, C, 3, 3) weight: its ratio is the cost of
    standardizing the weights, which has no torch op.
    """
    x = torch.randn(shape, device=device).requires_grad_()
    dy = torch.randn(shape, device=device)
    c = shape[1]
    if layer == "rms_norm":
        normalized = shape[1:]
        weight = (torch.rand(normalized, device=device) + 0.5).requires_grad_()
        bias = None
        native = lambda: tF.rms_norm(x, normalized, weight, 1e-6)
        ours = lambda: ncF.rms_norm(x, normalized, weight, 1e-6)
        composed = lambda: ncF.rms_norm_autograd(x, normalized, weight, 1e-6)
    elif layer == "ws_conv":
        weight = (0.1 * torch.randn(c, c, 3, 3, device=device)).requires_grad_()
        bias = None
        native = lambda: tF.conv2d(x, weight, padding=1)
        ours = lambda: tF.conv2d(x, ncF.weight_standardization(weight), padding=1)
        composed = lambda: tF.conv2d(x, ncF.weight_standardization_autograd(weight), padding=1)
    else:
        weight, bias = _channel_args(shape, device)
        groups = benchmark_groups(c) if layer == "group_norm" else c
        native = (lambda: tF.group_norm(x, groups, weight, bias, 1e-5)) if layer == "group_norm" \
            else (lambda: tF.instance_norm(x, None, None, weight, bias, True, 0.1, 1e-5))
        ours = lambda: ncF.group_norm(x, groups, weight, bias, 1e-5)
        composed = lambda: ncF.group_norm_autograd(x, groups, weight, bias, 1e-5)
    return timed_variants((x, weight, bias), dy, native, ours, composed)


def count_operations(run) -> int:
    """How many ATen operations one call of ``run`` dispatches (forward and backward together).

    Counted with a ``TorchDispatchMode``, below autograd: the backward's operations count too,
    views and in-place updates included. Exact and repeatable, unlike a time.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        run()
    return Counter.count


def rms_versus_layer_norm(device, shapes=None, quick: bool = True):
    """RMSNorm against LayerNorm on the same shapes: operation counts and time ratios.

    For each shape and each of torch's native op, our Function and the autograd composition:
    ``ops`` (RMSNorm's, LayerNorm's ATen operation counts for forward+backward) and ``time_ratio``
    (RMSNorm's median time / LayerNorm's). Dropping the re-centring removes a mean, a subtraction,
    and their terms in the backward.
    """
    repeats, min_time = (3, 0.01) if quick else (7, 0.2)
    rows = []
    for shape_name, shape in shapes or SHAPES:
        torch.manual_seed(0)
        rms, _, _ = make_cases_without_batch("rms_norm", shape, device)
        ln, _, _ = make_cases("layer_norm", shape, device)
        row = {"shape": shape_name}
        for variant in ("native", "function", "autograd"):
            ops = (count_operations(rms[variant]), count_operations(ln[variant]))
            times = [median_time(c[variant], device, repeats, min_time) for c in (rms, ln)]
            row[variant] = {"ops": ops, "time_ratio": times[0] / times[1]}
        rows.append(row)
    return rows


def format_rms_versus_layer_norm(rows) -> str:
    """A markdown table of ``rms_versus_layer_norm``'s rows."""
    variants = ("native", "function", "autograd")
    lines = ["| shape | " + " | ".join(f"{v}: ops RMS / LN, time RMS / LN" for v in variants) + " |",
             "|" + " --- |" * (1 + len(variants))]
    for r in rows:
        cells = [f"{r[v]['ops'][0]} / {r[v]['ops'][1]}, {r[v]['time_ratio']:.2f}x" for v in variants]
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
