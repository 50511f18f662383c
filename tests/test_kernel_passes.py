"""normcourse.kernel_passes: counting the passes over memory in inductor's generated C++, and the
fixed cost per call of ``benchmarking.fixed_cost_per_call``. Nothing here is timed.

The appendix states how many passes the compiled batch norm makes; the live tests compile it with
inductor (a C++ build, a few seconds) and check those counts and the committed data file.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from normcourse import benchmarking as B
from normcourse import kernel_passes as K

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
# inductor builds its C++ with $CXX if set, else g++ or clang++; without one there is nothing
# to count
COMPILERS = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in COMPILERS),
    reason="torch.compile's inductor backend needs a C++ compiler (g++ or clang++, or $CXX); none found")

# Two nests in inductor's style: a column reduction (per-channel results only) and an
# elementwise pass that reads x and a per-channel vector and writes y.
SOURCE = """
extern "C"  void  kernel(const float* in_ptr0, const float* in_ptr1, float* out_ptr0, float* out_ptr1)
{
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(16L); x0+=static_cast<int64_t>(8L))
        {
            {
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(4L); x1+=static_cast<int64_t>(1L))
                {
                    auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x0 + 16L*x1), static_cast<int64_t>(8));
                    tmp_acc0_vec = tmp_acc0_vec + tmp0;
                }
            }
            tmp_acc0_vec.store(out_ptr0 + static_cast<int64_t>(x0));
        }
    }
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(4L); x0+=static_cast<int64_t>(1L))
        {
            for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(16L); x1+=static_cast<int64_t>(1L))
            {
                auto tmp0 = in_ptr0[static_cast<int64_t>(x1 + 16L*x0)];
                auto tmp1 = out_ptr0[static_cast<int64_t>(x1)];
                auto tmp2 = in_ptr1[static_cast<int64_t>(x1)];
                out_ptr1[static_cast<int64_t>(x1 + 16L*x0)] = tmp0 - tmp1 * tmp2;
            }
        }
    }
}
"""


def test_parser_finds_each_nest_and_only_tensor_sized_accesses():
    (body,) = K._kernel_bodies(SOURCE)
    passes = K.memory_passes(body, numel=64)
    assert [(p.reads, p.writes) for p in passes] == [(("in_ptr0",), ()),
                                                      (("in_ptr0",), ("out_ptr1",))]
    assert passes[0].loops == ((16, 8, 0), (4, 1, 1)) and passes[1].loops == ((4, 1, 0), (16, 1, 1))
    assert K.tensor_transfers(passes) == 3
    assert str(passes[0]) == "forward: loops 16 (by 8) > 4; reads 1, writes 0 (a reduction)"
    # the per-channel vectors (16 values) are tensor-sized only for a 16-element tensor
    assert K.tensor_transfers(K.memory_passes(body, numel=16)) == 6


@pytest.fixture(scope="module")
def batch_norm_fc_passes():
    return K.layer_passes("batch_norm", (256, 512))


@needs_cxx
def test_compiled_batch_norm_on_fc_makes_the_two_passes_each_way_of_torchs_kernels(batch_norm_fc_passes):
    # forward: the statistics (one nest: per block of columns the mean, then the variance while the
    # block is in cache), then y; backward: the two sums, then dx. 8 tensor transfers: the 5 of
    # minimum_traffic_bytes plus a second read of x forward and of x and dy backward, which any
    # kernel must make when the data does not stay in cache between the statistics and their use
    summary = [(p.direction, len(p.reads), len(p.writes)) for p in batch_norm_fc_passes]
    assert summary == [("forward", 1, 0), ("forward", 1, 1), ("backward", 2, 0), ("backward", 2, 1)]
    assert K.tensor_transfers(batch_norm_fc_passes) == 8


@needs_cxx
def test_compiled_conv_batch_norm_sweeps_once_more_for_the_variance():
    passes = K.layer_passes("batch_norm", (4, 8, 6, 6))
    assert [(p.direction, len(p.reads), len(p.writes)) for p in passes] == [
        ("forward", 1, 0), ("forward", 1, 0), ("forward", 1, 1), ("backward", 2, 0), ("backward", 2, 1)]
    assert K.tensor_transfers(passes) == 9


@needs_cxx
def test_committed_passes_are_what_this_torch_generates(batch_norm_fc_passes):
    report = json.loads((ROOT / "book" / "data" / "compiled_cpu.json").read_text())
    if report["torch"] != torch.__version__:
        pytest.skip(f"the committed file was written by torch {report['torch']}, "
                    f"this is {torch.__version__}")
    (row,) = [r for r in report["passes"] if r["layer"] == "batch_norm" and r["shape"] == "fc 256x512"]
    assert row["passes"] == [json.loads(json.dumps(vars(p))) for p in batch_norm_fc_passes]
    assert row["transfers"] == 8


def test_fixed_cost_rows_time_each_variant_on_both_shapes():
    # backend "eager": dynamo's wrappers without a C++ build; quick blocks
    rows = B.fixed_cost_per_call(torch.device("cpu"), layers=("batch_norm",), shape=(16, 8),
                                 rounds=2, quick=True, compile_backend="eager")
    (row,) = rows
    assert row["layer"] == "batch_norm" and row["shape"] == "16x8"
    assert set(row["variants"]) == {"native", "function", "compiled"}
    for t in row["variants"].values():
        assert t["floor_seconds"] > 0 and t["seconds"] > 0
    table = B.format_fixed_cost(rows)
    assert len(table.splitlines()) == 4 and "compiled" in table


@needs_cxx
def test_script_writes_passes_and_fixed_costs(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compiled as script
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(script, "SHAPES", [("fc 16x8", (16, 8))])
    monkeypatch.setattr(script, "fixed_cost_per_call",
                        lambda device, layers, quick: B.fixed_cost_per_call(
                            device, layers, (16, 8), rounds=1, quick=True, compile_backend="eager"))
    script.main(["--out", str(tmp_path), "--layers", "batch_norm", "--quick"])
    report = json.loads((tmp_path / "compiled_cpu.json").read_text())
    assert [r["shape"] for r in report["passes"]] == ["fc 16x8"]
    assert report["passes"][0]["transfers"] >= 5
    assert report["fixed_cost"][0]["layer"] == "batch_norm"
    assert "tensor transfers" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path), "--layers", "ws_conv"])
