"""What machine a number came from, and how much memory it took: read from the OS in one place,
for the run folders (`results.json`), the reproduce summary and `heft bench`."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import resource
import subprocess
from pathlib import Path

import torch

from heft.files import versions


def _cpuinfo_field(name: str) -> str | None:
    """The first `name: value` of /proc/cpuinfo (Linux), else None."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), None)


def cpu_model_name() -> str:
    """ "AMD EPYC ..." or "Intel Xeon ...": machines of one architecture differ several-fold in bf16
    speed (AMX or not), so timings name the model, not just x86_64."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo_field("flags") or "").split())


def device_info() -> dict[str, str | int]:
    """What trained a run, so a summary assembled elsewhere (GPU runs reported on a CPU machine)
    still says where its numbers come from."""
    if torch.cuda.is_available():
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "torch": torch.__version__,
        }
    return {"type": "cpu", "name": cpu_model_name(), "count": os.cpu_count() or 1, "torch": torch.__version__}


def proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB; None where the OS has none."""
    try:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(key + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (`find_library` runs a subprocess on Linux)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_freed_memory() -> None:
    """Hand the memory this process has freed back to the OS (glibc's `malloc_trim`; nothing elsewhere).

    The C allocator keeps freed blocks for reuse, so after one measured path has freed its
    activations the next one reuses them without its RSS growing: its peak above the current RSS
    would read near zero (what `heft bench` printed for the paths it ran last)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def reset_peak_memory(device: torch.device | None = None) -> float | None:
    """Start a new peak-memory window. Returns the baseline a CPU peak is measured from (the
    current RSS, after freed memory went back to the OS; 0 on CUDA), or None where the OS cannot
    reset its peak."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        return None
    return proc_status_mb("VmRSS")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def code_versions() -> dict[str, str | None]:
    """Python, the libraries and the code's git commit: a benchmark result belongs to a revision."""
    out: dict[str, str | None] = {"python": platform.python_version(), **versions()}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        out["git_commit"] = git("rev-parse", "HEAD") + (
            "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out
