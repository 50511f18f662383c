"""normcourse.benchmarking and the memory claims of the performance appendix. Nothing here is timed.

- Memory: for every layer, the closed-form Function keeps strictly fewer bytes for the backward
  pass than the autograd composition. Counted exactly with saved-tensor hooks, so the check is
  deterministic (a timing never is).
- The benchmark's quick path runs end to end on a tiny shape list and yields a row per (layer,
  shape) with every variant, its ratio to native, and the table and plot built from them.
- torch.compile gives the Functions' gradients (batch renorm updates its inputs in place, which
  torch 2.13's partitioner once got wrong); checked with the fast ``aot_eager_decomp_partition``
  backend, which runs the same partitioner as inductor without compiling C++.
"""

import pytest
import torch

import matplotlib

matplotlib.use("Agg")

from normcourse import benchmarking as B  # noqa: E402
from normcourse import functional as nf  # noqa: E402

torch.set_num_threads(1)

LAYERS = ["batch_norm", "layer_norm", "batch_renorm"]
CPU = torch.device("cpu")


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", [(16, 8), (4, 3, 5, 5)])
def test_function_saves_less_than_autograd_and_no_more_than_native(layer, shape):
    torch.manual_seed(0)
    cases, _, _ = B.make_cases(layer, shape, CPU)
    saved = {variant: B.saved_bytes(run) for variant, run in cases.items()}
    assert saved["function"] < saved["autograd"], saved
    # one tensor of x's size plus per-channel (or per-row) vectors, like torch's own kernels:
    # the input itself, which a second derivative needs
    elements, itemsize = torch.Size(shape).numel(), 4
    assert elements * itemsize <= saved["function"] < 2 * elements * itemsize, saved
    assert saved["autograd"] >= 2 * elements * itemsize, saved


def test_saved_bytes_counts_exactly_what_autograd_keeps():
    x = torch.randn(10, 3, requires_grad=True)
    # exp saves its output (30 floats); sum saves nothing but sizes
    assert B.saved_bytes(lambda: x.exp().sum().backward()) == 30 * 4
    # mul of two tensors saves both operands
    y = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    assert B.saved_bytes(lambda: (y * y.detach()).sum().backward()) == 30 * 8


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setattr(B, "SHAPES", [("fc 8x4", (8, 4)), ("conv 2x3x2x2", (2, 3, 2, 2))])


def test_quick_benchmark_runs_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setattr(B, "SHAPES", [("fc 8x4", (8, 4))])
    lines = []
    # the compiled variant through dynamo only (backend "eager"): inductor's C++ build would take
    # most of a minute; the compiled Functions' numbers are checked below with AOT autograd
    results = B.run_benchmarks(CPU, quick=True, log=lines.append, compile=True, compile_backend="eager")
    assert [(r["layer"], r["shape"]) for r in results] == [
        (layer, "fc 8x4") for layer in B.LAYERS if B.applies(layer, (8, 4))
    ]
    assert {r["layer"] for r in results} >= set(LAYERS) | {"group_norm", "rms_norm"}
    assert len(lines) == len(results)
    for r in results:
        assert r["elements"] == 32
        for variant in ("native", "function", "autograd", "compiled"):
            entry = r[variant]
            assert entry["seconds"] > 0 and entry["saved_bytes"] >= 0
            assert entry["ratio"] == pytest.approx(entry["seconds"] / r["native"]["seconds"])
        assert r["native"]["ratio"] == 1.0
        assert 0 < r["function"]["saved_bytes"] < r["autograd"]["saved_bytes"]

    table = B.markdown_table(results)
    rows = table.strip().splitlines()
    assert len(rows) == 2 + len(results)
    for variant in ("native", "function", "autograd", "compiled"):
        assert f"{variant} ms (x native)" in rows[0] and f"{variant} saved MiB" in rows[0]
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert f"({results[0]['function']['ratio']:.2f}x)" in rows[2]

    fig = B.plot_ratios(results, "test")
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * len(results)  # function, autograd, compiled per row
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["function", "autograd", "compiled"]
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def load_run_script():
    """benchmarks/run.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def test_run_script_writes_json_table_and_plot(tiny_shapes, tmp_path, monkeypatch):
    import json

    run = load_run_script()
    monkeypatch.setattr(run, "measure_bandwidth", lambda device: 1e9)  # skip the 256 MiB copy
    run.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    report = json.loads((tmp_path / "benchmark_cpu.json").read_text())
    assert report["device"] == "cpu" and report["threads"] == 1 and report["quick"] is True
    shapes = [(8, 4), (2, 3, 2, 2)]
    assert len(report["results"]) == sum(B.applies(l, s) for l in B.LAYERS for s in shapes)
    assert len(report["results"]) == 3 * 2 + 2 + 4  # + group norm, RMSNorm; + all four on conv
    assert (tmp_path / "benchmark_cpu.md").read_text() == B.markdown_table(report["results"])
    assert (tmp_path / "benchmark_cpu.png").stat().st_size > 0
    rms_rows = report["rms_versus_layer_norm"]
    assert [r["shape"] for r in rms_rows] == ["fc 8x4", "conv 2x3x2x2"]
    assert (tmp_path / "benchmark_cpu_rms_vs_layer_norm.md").read_text() == \
        B.format_rms_versus_layer_norm(rms_rows)


def test_run_script_measures_the_layers_asked_for(tiny_shapes, tmp_path, monkeypatch):
    import json

    run = load_run_script()
    monkeypatch.setattr(run, "measure_bandwidth", lambda device: 1e9)
    monkeypatch.setattr(run, "rms_versus_layer_norm", lambda device, quick: [])
    run.main(["--quick", "--out", str(tmp_path), "--device", "cpu",
              "--layers", "layer_norm,ws_conv", "--layers", "rms_norm"])
    report = json.loads((tmp_path / "benchmark_cpu.json").read_text())
    # in LAYERS' order; ws_conv only on the conv shape
    assert [(r["layer"], r["shape"]) for r in report["results"]] == [
        ("layer_norm", "fc 8x4"), ("layer_norm", "conv 2x3x2x2"),
        ("rms_norm", "fc 8x4"), ("rms_norm", "conv 2x3x2x2"), ("ws_conv", "conv 2x3x2x2")]
    with pytest.raises(SystemExit):
        run.main(["--quick", "--out", str(tmp_path), "--layers", "layer_norm,nope"])


def test_minimum_traffic_is_five_tensor_transfers():
    assert B.minimum_traffic_bytes(1000) == 5 * 1000 * 4
    assert B.minimum_traffic_bytes(1000, itemsize=2) == 5 * 1000 * 2


@pytest.mark.parametrize("layer", LAYERS)
def test_compiled_function_matches_eager(layer):
    """Output, gradients and running statistics of the compiled Function equal the eager ones,
    with momentum > 0 so that the running statistics change during the forward pass."""
    gen = torch.Generator().manual_seed(0)
    shape = (12, 5)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    w = (0.5 + torch.rand(5, generator=gen)).requires_grad_()
    b = torch.randn(5, generator=gen).requires_grad_()
    dy = torch.randn(shape, generator=gen)

    def fn(x, w, b, running_mean, running_second):
        if layer == "batch_norm":
            return nf.batch_norm(x, running_mean, running_second, w, b, True, 0.1, 1e-5)
        if layer == "batch_renorm":  # limits tight enough that r and d are clipped
            return nf.batch_renorm(x, running_mean, running_second, w, b, True, 1.2, 0.1, 0.1, 1e-5)
        return nf.layer_norm(x, (5,), w, b, 1e-5)

    results = []
    torch._dynamo.reset()
    for f in (fn, torch.compile(fn, backend="aot_eager_decomp_partition", fullgraph=True)):
        running = (torch.linspace(-1, 1, 5), torch.linspace(0.5, 2, 5))
        out = f(x, w, b, *running)
        grads = torch.autograd.grad(out, (x, w, b), dy)
        results.append((out, *grads, *running))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Chapter 8's layers: group norm, instance norm, RMSNorm, the weight-standardized convolution
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["group_norm", "instance_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(16, 8), (4, 8, 5, 5)])
def test_chapter8_functions_save_one_input_sized_tensor(layer, shape):
    if not B.applies(layer, shape):
        pytest.skip("instance norm needs spatial axes")
    torch.manual_seed(0)
    cases, _, _ = B.make_cases(layer, shape, CPU)
    saved = {variant: B.saved_bytes(run) for variant, run in cases.items()}
    elements, itemsize = torch.Size(shape).numel(), 4
    # x itself and gamma: the statistics are recomputed in the (double-differentiable) backward
    assert elements * itemsize <= saved["function"] < 2 * elements * itemsize, saved
    assert saved["function"] < saved["autograd"], saved


def test_ws_conv_function_saves_less_than_the_composition():
    torch.manual_seed(0)
    cases, _, _ = B.make_cases("ws_conv", (2, 8, 5, 5), CPU)
    assert B.saved_bytes(cases["function"]) < B.saved_bytes(cases["autograd"])


def test_instance_norm_and_ws_conv_rows_need_spatial_axes():
    assert not B.applies("instance_norm", (8, 4)) and not B.applies("ws_conv", (8, 4))
    assert all(B.applies(layer, (2, 3, 2, 2)) for layer in B.LAYERS)
    assert B.benchmark_groups(64) == 8 and B.benchmark_groups(12) == 4


def test_rms_norm_needs_fewer_operations_than_layer_norm():
    """Dropping the re-centring: fewer ATen operations, forward and backward, in the like-for-like
    compositions and in our Functions. (Counts, not times: deterministic.)"""
    rows = B.rms_versus_layer_norm(CPU, [("fc 8x6", (8, 6)), ("conv 2x3x4x4", (2, 3, 4, 4))])
    for row in rows:
        for variant in ("function", "autograd"):
            rms_ops, ln_ops = row[variant]["ops"]
            assert 0 < rms_ops <= ln_ops, row
        assert row["autograd"]["ops"][0] < row["autograd"]["ops"][1], row
        assert all(row[v]["time_ratio"] > 0 for v in ("native", "function", "autograd"))
    table = B.format_rms_versus_layer_norm(rows).strip().splitlines()
    assert len(table) == 2 + len(rows) and "fc 8x6" in table[2]


def test_count_operations_counts_forward_and_backward():
    x = torch.randn(4, requires_grad=True)
    forward_only = B.count_operations(lambda: x.exp())
    both = B.count_operations(lambda: x.exp().sum().backward())
    # exp saves its output (a detach shows up as one more operation); backward adds several
    assert 1 <= forward_only < both


@pytest.mark.parametrize("layer", ["group_norm", "rms_norm", "instance_norm"])
def test_compiled_chapter8_function_matches_eager(layer):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, 6, 5), generator=gen, requires_grad=True)
    w = (0.5 + torch.rand(6, generator=gen)).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_()
    dy = torch.randn((4, 6, 5), generator=gen)

    def fn(x, w, b, running_mean, running_var):
        if layer == "group_norm":
            return nf.group_norm(x, 3, w, b)
        if layer == "instance_norm":
            return nf.instance_norm(x, running_mean, running_var, w, b, True, 0.1, 1e-5)
        return nf.rms_norm(x.transpose(1, 2), (6,), w, 1e-6).transpose(1, 2)

    results = []
    torch._dynamo.reset()
    for f in (fn, torch.compile(fn, backend="aot_eager_decomp_partition", fullgraph=True)):
        running = (torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6))
        out = f(x, w, b, *running)
        params = (x, w) if layer == "rms_norm" else (x, w, b)  # RMSNorm has no bias
        grads = torch.autograd.grad(out, params, dy)
        results.append((out, *grads, *running))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Achieved bandwidth as a fraction of a copy's, and the devices measured
# ---------------------------------------------------------------------------------------------
def test_copy_fraction_is_the_copy_time_over_the_variant_time(monkeypatch):
    monkeypatch.setattr(B, "LAYERS", ("batch_norm", "ws_conv"))
    monkeypatch.setattr(B, "SHAPES", [("conv 2x3x4x4", (2, 3, 4, 4))])
    results = B.run_benchmarks(CPU, quick=True, log=lambda line: None, compile=False)
    norm, conv = results
    assert norm["copy_seconds"] > 0
    for variant in ("native", "function", "autograd"):
        assert norm[variant]["copy_fraction"] == norm["copy_seconds"] / norm[variant]["seconds"]
    # a convolution is not memory-bound: no copy to compare it with
    assert "copy_seconds" not in conv and "copy_fraction" not in conv["native"]
    head, _, norm_row, conv_row = B.markdown_table(results).strip().splitlines()
    assert head.endswith("| native / copy bandwidth | function / copy bandwidth |")
    assert norm_row.endswith(f"| {norm['native']['copy_fraction']:.2f} | "
                             f"{norm['function']['copy_fraction']:.2f} |")
    assert conv_row.endswith("| - | - |")


def test_copy_moves_the_bytes_it_is_asked_to(monkeypatch):
    moved = []

    def time_once(run, *args):
        run()
        return 1.0

    monkeypatch.setattr(B, "median_time", time_once)
    real_copy = torch.Tensor.copy_

    def spy(dst, src, *args):
        moved.append(dst.numel() * dst.element_size() + src.numel() * src.element_size())
        return real_copy(dst, src, *args)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    assert B.copy_seconds(B.minimum_traffic_bytes(1000), CPU) == 1.0
    assert moved == [B.minimum_traffic_bytes(1000)]  # read + written


def test_devices_say_when_no_gpu_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices, note = B.benchmark_devices()
    assert devices == ["cpu"] and note.startswith("no CUDA device found: CPU only")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        B.benchmark_devices(["cuda"])
    assert B.benchmark_devices(["cpu"])[0] == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert B.benchmark_devices() == (["cpu", "cuda"], "CUDA device found (Some GPU): CPU and CUDA")


def test_run_script_says_it_runs_on_the_cpu_only(tiny_shapes, tmp_path, monkeypatch, capsys):
    run = load_run_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "measure_bandwidth", lambda device: 1e9)
    run.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("# no CUDA device found: CPU only")
    assert (tmp_path / "benchmark_cpu.json").is_file()
    assert not (tmp_path / "benchmark_cuda.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the CUDA path of the benchmark runs only on a GPU")
def test_the_benchmark_runs_on_cuda(tiny_shapes):
    cuda = torch.device("cuda")
    results = B.run_benchmarks(cuda, quick=True, log=lambda line: None, compile=False)
    assert results
    for r in results:
        for variant in ("native", "function", "autograd"):
            assert r[variant]["seconds"] > 0 and r[variant]["peak_bytes"] > 0
        if r["layer"] in B.MEMORY_BOUND:
            assert r["native"]["copy_fraction"] > 0
    assert B.measure_bandwidth(cuda) > 0
