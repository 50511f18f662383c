"""What an eager layer pays the operating system: fresh pages for its temporary tensors.

A CPU tensor's memory comes from the C library's allocator (glibc's ``malloc`` on Linux). When
memory at the top of its heap is freed and the free space there exceeds the *trim threshold*,
glibc gives it back to the operating system; once a large block has been freed, glibc sets that
threshold to twice the block's size (8 MiB after a 4 MiB tensor). The next tensor then gets fresh
pages, and the kernel maps and zeroes each 4 KiB page on its first touch: a *minor page fault*,
paid in system time, which the benchmark's process CPU time includes. A forward+backward pass
that allocates and frees several input-sized temporaries per call pays for more of them than one
that allocates only its outputs.

``os_cost_per_call`` counts them for one run; ``benchmarks/page_faults.py`` measures every eager
variant in fresh processes, with glibc's defaults and with trimming turned off
(``KEEP_FREED_MEMORY``), for the performance appendix.
"""

from __future__ import annotations

import platform
import statistics
import time

from normcourse.benchmarking import calls_per_block

# glibc tunables that keep freed memory in the process: never trim the heap, and serve every
# block below 32 MiB from the heap (not from mmap, whose blocks go back to the system when freed).
KEEP_FREED_MEMORY = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=33554432"


def glibc_version() -> str | None:
    """The C library's version when it is glibc (whose tunables ``KEEP_FREED_MEMORY`` sets), else
    None (macOS, musl, Windows: the tunables do nothing there)."""
    name, version = platform.libc_ver()
    return version if name == "glibc" else None


def os_cost_per_call(run, blocks: int = 5, min_time: float = 0.2) -> dict[str, float]:
    """Per call of ``run`` (a zero-argument function): CPU seconds, the part of them spent in the
    kernel (``system_seconds``) and minor page faults, each the median over ``blocks`` timed
    blocks of enough calls to last ``min_time`` seconds of CPU time.

    Unix only (``resource.getrusage``). The fault count is the robust number: it does not
    depend on how busy the machine is, the times do.
    """
    import resource  # not on Windows

    calls = calls_per_block(run, min_time)
    samples = []
    for _ in range(blocks):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        for _ in range(calls):
            run()
        seconds, after = time.process_time() - t0, resource.getrusage(resource.RUSAGE_SELF)
        samples.append((seconds / calls, (after.ru_stime - before.ru_stime) / calls,
                        (after.ru_minflt - before.ru_minflt) / calls))
    seconds, system, faults = (statistics.median(column) for column in zip(*samples))
    return {"seconds": seconds, "system_seconds": system, "minor_faults": faults}


def format_page_faults(rows) -> str:
    """``benchmarks/page_faults.py``'s rows as aligned text: per variant, milliseconds per
    forward+backward, the share of it spent in the kernel, and page faults per call, with glibc's
    defaults and with freed memory kept."""
    lines = [f"{'layer':<13} {'shape':<17} {'variant':<9}"
             f"{'default: ms':>12} {'kernel':>7} {'faults':>7}"
             f"{'kept: ms':>10} {'kernel':>7} {'faults':>7}"]
    for r in rows:
        for variant, default in r["default"]["variants"].items():
            kept = r["keep_freed"]["variants"][variant]
            cells = "".join(
                f"{t['seconds'] * 1e3:{width}.2f} {t['system_seconds'] / t['seconds']:6.0%} "
                f"{t['minor_faults']:7.0f}" for t, width in ((default, 12), (kept, 10)))
            lines.append(f"{r['layer']:<13} {r['shape']:<17} {variant:<9}{cells}")
    return "\n".join(lines) + "\n"
