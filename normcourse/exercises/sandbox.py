"""A sandbox for one untrusted submission: its own folder, environment, limits and processes.

``Sandbox(limits)`` (a context manager) makes a fresh temporary folder with ``home/`` (``HOME`` and
the Jupyter, IPython and matplotlib state folders point inside it) and starts commands there:

- a scrubbed environment (``sandbox_env``): nothing of the instructor's environment but ``PATH``,
  the locale and the package's folder on ``PYTHONPATH``; one thread;
- resource limits set with ``resource.setrlimit`` in the child before it execs the command
  (address space, CPU time, file size, processes, open files), inherited by everything it starts;
- its own session (process group), and where this machine lets us create them, its own ``pids``
  and ``memory`` cgroups: the process limit of a cgroup holds even for root, for whom
  ``RLIMIT_NPROC`` is not enforced; ``kill_all`` kills every process in the cgroup or the group;
- where ``unshare`` and ``mount`` work (root, or a container with CAP_SYS_ADMIN), a private mount
  namespace in which the folders in ``read_only`` (the submissions, the instructor's working
  folder) and always the package, the Python installation and ``~`` are mounted read-only;
- a limit on everything written into the folder (``disk_mb``): where mounts work, the folder is
  a tmpfs of that size; everywhere a watchdog measures the folder every ``DISK_POLL`` seconds and,
  when it is full, kills every process of the submission and empties the folder (the run is
  reported as "disk limit exceeded"; the grader's checks then run in the emptied folder);
- where ``unshare --net`` and ``ip`` work, a private network namespace holding only its own
  loopback (the kernel and the grader's helper talk over it): no network, and no server of the
  grading machine is reachable.

Output of every command is captured and capped (``CappedReader``). ``isolation()`` says which of
the protections are in force on this machine (the grading report repeats it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import normcourse

__all__ = ["Limits", "LIMIT_UNITS", "Sandbox", "CappedReader", "isolation", "sandbox_env",
           "PACKAGE_PARENT"]

PACKAGE_PARENT = str(Path(normcourse.__file__).resolve().parents[1])
CGROUP_ROOT = Path("/sys/fs/cgroup")
MB = 1024 * 1024
# Seconds between two measurements of the sandbox's folder. Without a tmpfs, a fast writer
# overshoots the limit by what it writes in about one round: 23-47 MiB measured on a quiet machine.
DISK_POLL = 0.02


@dataclass(frozen=True)
class Limits:
    """Resource limits for one submission (each process, unless said otherwise).

    memory_mb: address space of each process (RLIMIT_AS), and memory of the whole tree where a
        memory cgroup can be made. cpu_seconds: CPU time of each process (RLIMIT_CPU).
    file_size_mb: largest file a process may write (RLIMIT_FSIZE). processes: processes and
        threads of the whole tree (pids cgroup; RLIMIT_NPROC otherwise, not enforced for root).
    open_files: RLIMIT_NOFILE. output_kb: output kept per cell and per helper process.
    disk_mb: everything written into the sandbox's folder, all files together (a tmpfs of this
        size where mounts work, and a watchdog that kills the submission when it is reached).
    """

    memory_mb: int = 4096
    cpu_seconds: int = 600
    file_size_mb: int = 64
    processes: int = 256
    open_files: int = 512
    output_kb: int = 256
    disk_mb: int = 512


# Each limit's unit, for the command line's options and the instructors' page.
LIMIT_UNITS = {
    "memory_mb": "MiB of address space per process (and of the whole tree, in a memory cgroup)",
    "cpu_seconds": "CPU seconds per process",
    "file_size_mb": "MiB per file written",
    "processes": "processes and threads of the whole tree",
    "open_files": "open files per process",
    "output_kb": "KiB of output kept per cell",
    "disk_mb": "MiB written into the submission's folder, all files together",
}


# Runs first in every sandboxed process (``python -I -c BOOT CONFIG COMMAND...``): joins the
# cgroups, mounts the read-only folders (inside ``unshare --mount``), sets the limits, then execs
# the command. Kept small and free of imports from the package: nothing has been limited yet.
BOOT = r"""
import json, os, resource, subprocess, sys
config = json.loads(sys.argv[1])
for procs in config["cgroups"]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
if config["own_network"]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for path in config["read_only"]:
    subprocess.run(["mount", "--bind", path, path], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)
for name, value in config["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.execve(sys.argv[2], sys.argv[2:], os.environ)
"""


def _user_processes() -> int:
    """Processes (and threads) this user runs now: RLIMIT_NPROC counts all of them."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _rlimits(limits: Limits) -> dict:
    import resource

    def capped(name, value):  # never above the hard limit we already have
        hard = resource.getrlimit(getattr(resource, name))[1]
        return value if hard == resource.RLIM_INFINITY else min(value, hard)

    nproc = limits.processes + (0 if os.getuid() == 0 else _user_processes())
    return {
        "RLIMIT_AS": capped("RLIMIT_AS", limits.memory_mb * MB),
        "RLIMIT_CPU": capped("RLIMIT_CPU", limits.cpu_seconds),
        "RLIMIT_FSIZE": capped("RLIMIT_FSIZE", limits.file_size_mb * MB),
        "RLIMIT_NPROC": capped("RLIMIT_NPROC", nproc),
        "RLIMIT_NOFILE": capped("RLIMIT_NOFILE", limits.open_files),
    }


def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup folder for a v1 controller, if it is mounted and writable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            folder = CGROUP_ROOT / controller / path.lstrip("/")
            return folder if os.access(folder, os.W_OK) else None
    return None


def _make_cgroups(name: str, limits: Limits) -> list[Path]:
    """Create pids and memory cgroups named ``name`` with the limits; return the folders made."""
    made = []
    settings = {
        "pids": {"pids.max": str(limits.processes)},
        "memory": {"memory.limit_in_bytes": str(limits.memory_mb * MB)},
    }
    for controller, values in settings.items():
        parent = _own_cgroup(controller)
        if parent is None:
            continue
        folder = parent / name
        try:
            folder.mkdir()
            for key, value in values.items():
                (folder / key).write_text(value)
        except OSError:
            _remove_cgroup(folder)
            continue
        made.append(folder)
    return made


def _remove_cgroup(folder: Path) -> None:
    for _ in range(100):
        try:
            pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    try:
        folder.rmdir()
    except OSError:
        pass


def _mount_tmpfs(folder: Path, size_mb: int) -> bool:
    """Mount a tmpfs of ``size_mb`` MiB on ``folder``; False where this machine does not let us."""
    if not isolation()["read_only_mounts"]:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700",
                           "normcourse-grade", str(folder)], capture_output=True)
    return done.returncode == 0


def _disk_used(folder: Path, tmpfs: bool) -> int:
    """Bytes stored in ``folder``: the tmpfs's use, or the allocated size of every file in it."""
    if tmpfs:
        stats = os.statvfs(folder)
        return (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    used = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                used += os.lstat(os.path.join(parent, name)).st_blocks * 512
            except OSError:
                continue
    return used


def _mount_namespace_works() -> bool:
    if os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0


def _network_namespace_works() -> bool:
    if os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"],
                           capture_output=True)
    return probe.returncode == 0


_ISOLATION: dict | None = None


def isolation() -> dict:
    """Which protections work on this machine: cgroups, read-only mounts, process limit."""
    global _ISOLATION
    if _ISOLATION is None:
        cgroups = {c: _own_cgroup(c) is not None for c in ("pids", "memory")}
        _ISOLATION = {
            "pids_cgroup": cgroups["pids"],
            "memory_cgroup": cgroups["memory"],
            "read_only_mounts": _mount_namespace_works(),
            "own_network": _network_namespace_works(),
            "root": os.getuid() == 0,
        }
        _ISOLATION["process_limit_enforced"] = cgroups["pids"] or os.getuid() != 0
    return _ISOLATION


def sandbox_env(folder: Path) -> dict:
    """The scrubbed environment of a sandboxed process living in ``folder``."""
    home = folder / "home"
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "TMPDIR": str(folder / "tmp"),
        "PYTHONPATH": PACKAGE_PARENT,
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "JUPYTER_DATA_DIR": str(home / ".local" / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / ".local" / "share" / "jupyter" / "runtime"),
        "IPYTHONDIR": str(home / ".ipython"),
        "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


class CappedReader(threading.Thread):
    """Drain a binary stream in a thread, keeping at most ``cap`` bytes (the rest is counted)."""

    def __init__(self, stream, cap: int):
        super().__init__(daemon=True)
        self.stream, self.cap = stream, cap
        self.chunks: list[bytes] = []
        self.kept = self.dropped = 0
        self.start()

    def run(self) -> None:
        try:
            while chunk := self.stream.read1(65536) if hasattr(self.stream, "read1") else \
                    self.stream.read(65536):
                room = self.cap - self.kept
                self.chunks.append(chunk[:room])
                self.kept += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - room)
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        self.join(timeout=5)
        text = b"".join(self.chunks).decode("utf-8", "replace")
        return text + (f"\n[... {self.dropped} more bytes not kept]" if self.dropped else "")


class Sandbox:
    """One submission's temporary folder, cgroups and processes (use as a context manager).

    read_only: folders mounted read-only for the sandboxed processes (where mounts work).
    tmpfs: make the folder a tmpfs of ``limits.disk_mb`` where mounts work (the watchdog that
        enforces ``disk_mb`` runs in any case).
    """

    def __init__(self, limits: Limits | None = None, read_only: tuple[str, ...] = (),
                 tmpfs: bool = True):
        self.limits = limits or Limits()
        self.folder = Path(tempfile.mkdtemp(prefix="normcourse-grade-"))
        # One MiB above the limit, so that the watchdog sees the limit reached on a full tmpfs.
        self.tmpfs = tmpfs and _mount_tmpfs(self.folder, self.limits.disk_mb + 1)
        self._make_folders()
        self.work = self.folder / "work"
        self.name = f"normcourse-grade-{uuid.uuid4().hex[:12]}"
        self.cgroups = _make_cgroups(self.name, self.limits)
        self.processes: list[subprocess.Popen] = []
        mounts = isolation()["read_only_mounts"]
        inside = lambda p: self.folder.resolve().is_relative_to(Path(p).resolve())  # noqa: E731
        # The package, the Python installation and the instructor's home are always protected.
        protected = (*read_only, PACKAGE_PARENT, sys.prefix, str(Path.home()))
        self.read_only = list(dict.fromkeys(
            str(Path(p).resolve()) for p in protected
            if mounts and Path(p).is_dir() and not inside(p) and Path(p).resolve() != Path("/")))
        self.disk_hits, self.disk_peak = 0, 0
        # Held while processes are started or killed and while the watchdog empties the folder:
        # nothing starts in a folder being emptied.
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_disk, daemon=True)
        self._watchdog.start()

    def _make_folders(self) -> None:
        for sub in ("home", "tmp", "work"):
            (self.folder / sub).mkdir(exist_ok=True)

    def _watch_disk(self) -> None:
        """Kill everything and empty the folder each time its contents reach ``disk_mb``."""
        limit = self.limits.disk_mb * MB
        while not self._closed.wait(DISK_POLL):
            used = _disk_used(self.folder, self.tmpfs)
            self.disk_peak = max(self.disk_peak, used)
            if used < limit:
                continue
            with self._lock:
                self.disk_hits += 1
                self._kill_processes()
                for entry in list(self.folder.iterdir()):
                    shutil.rmtree(entry, ignore_errors=True)
                self._make_folders()

    def _kill_processes(self) -> None:
        """SIGKILL every process started here, their sessions and their cgroups' members."""
        for process in list(self.processes):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for folder in list(self.cgroups):
            try:
                pids = (folder / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, command: list[str], pass_fds: tuple[int, ...] = (),
              stdin=None) -> subprocess.Popen:
        """Start ``command`` (a list; ``command[0]`` a full path) limited, in ``self.work``.

        stdout and stderr are one pipe (``process.stdout``); read it with CappedReader.
        """
        config = {
            "cgroups": [str(folder / "cgroup.procs") for folder in self.cgroups],
            "read_only": self.read_only,
            "rlimits": _rlimits(self.limits),
            "own_network": isolation()["own_network"],
        }
        boot = [sys.executable, "-I", "-c", BOOT, json.dumps(config), *command]
        namespaces = (["--mount", "--propagation", "private"] if self.read_only else []) + (
            ["--net"] if config["own_network"] else [])
        if namespaces:
            boot = ["unshare", *namespaces, "--", *boot]
        with self._lock:
            process = subprocess.Popen(
                boot, cwd=self.work, env=sandbox_env(self.folder), stdin=stdin,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=pass_fds,
                start_new_session=True,
            )
            self.processes.append(process)
        return process

    def python(self, code: str, *args: str, **kwargs) -> subprocess.Popen:
        """Start ``python -I`` running ``code`` with the package importable (argv: ``args``)."""
        prelude = (f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
                   f"sys.argv[1:] = {list(args)!r}\n")
        return self.start([sys.executable, "-I", "-c", prelude + code], **kwargs)

    def kill_all(self) -> None:
        """Kill every process started here and everything they started (cgroup and session)."""
        with self._lock:
            self._kill_all()

    def _kill_all(self) -> None:
        self._kill_processes()
        for folder in self.cgroups:
            _remove_cgroup(folder)
        self.cgroups = _make_cgroups(self.name, self.limits) if self.cgroups else []
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.processes = []

    def close(self) -> None:
        self._closed.set()
        self._watchdog.join(timeout=10)
        self.kill_all()
        for folder in self.cgroups:
            _remove_cgroup(folder)
        self.cgroups = []
        if self.tmpfs:
            subprocess.run(["umount", "--lazy", str(self.folder)], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def limit_hits(self) -> dict[str, int]:
        """How often the cgroups refused a process (``processes``) or memory (``memory``), and
        how often the folder's contents reached the disk limit (``disk``)."""
        hits = {"disk": self.disk_hits} if self.disk_hits else {}
        for folder in self.cgroups:
            try:
                if (folder / "pids.events").exists():
                    events = dict(line.split() for line in
                                  (folder / "pids.events").read_text().splitlines())
                    hits["processes"] = int(events.get("max", 0))
                elif (folder / "memory.failcnt").exists():
                    hits["memory"] = int((folder / "memory.failcnt").read_text())
            except (OSError, ValueError):
                continue
        return hits

    def describe(self) -> dict:
        """The limits and protections in force, for the report."""
        return {"limits": asdict(self.limits), **isolation(),
                "disk": "tmpfs and watchdog" if self.tmpfs else "watchdog",
                "cgroups": [f.relative_to(CGROUP_ROOT).parts[0] for f in self.cgroups],
                "read_only_folders": self.read_only}
