"""normcourse.page_faults and benchmarks/page_faults.py: page faults are counted, and every case
is measured in a fresh process with and without glibc's heap trimming."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from normcourse.page_faults import (
    KEEP_FREED_MEMORY, format_page_faults, glibc_version, os_cost_per_call,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(glibc_version() is None, reason="glibc's allocator only")


def test_fresh_pages_are_counted_and_reused_memory_is_not():
    # 64 MiB is above glibc's largest mmap threshold (32 MiB): every call maps fresh pages, and
    # filling the tensor touches each of its 16,384 pages of 4 KiB.
    fresh = os_cost_per_call(lambda: torch.ones(16 * 2**20), blocks=3, min_time=0.05)
    buffer = torch.empty(16 * 2**20)
    reused = os_cost_per_call(lambda: buffer.fill_(1.0), blocks=3, min_time=0.05)
    assert fresh["minor_faults"] > 1000
    assert reused["minor_faults"] < 1
    for cost in (fresh, reused):
        assert 0 <= cost["system_seconds"] <= cost["seconds"] * 1.5  # clocks tick coarsely
    assert fresh["system_seconds"] > reused["system_seconds"]


@pytest.fixture(scope="module")
def script():
    """benchmarks/page_faults.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("page_faults_script",
                                                  ROOT / "benchmarks" / "page_faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_measures_each_case_in_two_fresh_processes(script, tmp_path, capsys):
    script.main(["--layers", "batch_norm", "--shapes", "fc 256x512", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "page_faults_cpu.json").read_text())
    assert report["keep_freed_memory"] == KEEP_FREED_MEMORY and report["glibc"] == glibc_version()
    (row,) = report["results"]
    assert (row["layer"], row["shape"]) == ("batch_norm", "fc 256x512")
    assert row["default"]["glibc_tunables"] is None
    assert row["keep_freed"]["glibc_tunables"] == KEEP_FREED_MEMORY
    for setting in ("default", "keep_freed"):
        assert set(row[setting]["variants"]) == {"native", "function", "autograd"}
    printed = capsys.readouterr().out
    assert printed.startswith(format_page_faults([row]).splitlines()[0])
    assert "wrote" in printed


def test_the_script_names_an_unknown_layer(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--layers", "batch_nrom"])
    assert "unknown layer batch_nrom" in capsys.readouterr().err
