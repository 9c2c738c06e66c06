"""GPU memory and timing helpers: profile a block, snapshot memory, find live CUDA tensors, size tensors.

Units: GB means 10**9 bytes and MB means 10**6 bytes (decimal, as `nvidia-smi`'s "GB" on data sheets and the seed's
examples use): a bfloat16 tensor of shape (64, 300, 2304) holds 88,473,600 bytes, shown as 88.47 MB and
0.0885 GB. (In GiB, 2**30 bytes, it would be 0.082.)

Without CUDA everything still runs and says so: `gpu_profile` times the block and reports the process's resident
memory (RSS) instead of GPU memory, `memory_stats` fills the seed's keys from the process and the system
(`allocated` = RSS, `reserved` = peak RSS, `free` / `total` = system memory) and `find_cuda_tensors` returns `[]`.

Example:
    >>> with gpu_profile("sleep") as prof:      # doctest: +SKIP
    ...     time.sleep(0.1)
    [sleep] 0.10s | rss 1.2GB | delta +0.0GB (no CUDA: CPU time and RSS)
    >>> round(prof.elapsed, 1)                   # doctest: +SKIP
    0.1
    >>> bandwidth_report(data_gb=4.6, elapsed=0.19)
    '4.6GB in 0.19s = 24.2 GB/s'
    >>> round(tensor_size_gb((64, 300, 2304)), 4)
    0.0885
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tracelens.errors import ConfigError


try:  # POSIX only; absent on Windows.
    import resource
except ImportError:  # pragma: no cover - exercised on Windows only
    resource = None  # type: ignore[assignment]

GB = 10**9
MB = 10**6
NO_CUDA_NOTE = "(no CUDA: CPU time and RSS)"


@dataclass
class Profile:
    """What `gpu_profile` measured; the fields are filled when the block exits (also when it raises).

    Attributes:
        name: the label passed to `gpu_profile`.
        cuda: True if GPU memory was measured, False if CUDA is absent and CPU RSS was used instead.
        elapsed: wall-clock seconds of the block, bracketed by `torch.cuda.synchronize()` when CUDA is present.
        peak_gb: CUDA: the most memory allocated by tensors during the block (GB). CPU: the process's peak RSS since
            it started (GB), which only reflects the block if the block raised it; None if unavailable.
        delta_gb: CUDA: allocated after minus before (GB). CPU: RSS after minus before (GB); None if unavailable.
        start_gb, end_gb: allocated (CUDA) or RSS (CPU) memory before and after the block, in GB.
    """

    name: str
    cuda: bool
    elapsed: float | None = None
    peak_gb: float | None = None
    delta_gb: float | None = None
    start_gb: float | None = None
    end_gb: float | None = None

    def summary(self) -> str:
        """The one-line report, e.g. `[forward pass] 0.45s | peak 12.3GB | delta +2.1GB`."""
        parts = [f"[{self.name}] {_fmt(self.elapsed, '.2f')}s"]
        if self.cuda:
            parts += [f"peak {_fmt(self.peak_gb, '.1f')}GB", f"delta {_fmt(self.delta_gb, '+.1f')}GB"]
            return " | ".join(parts)
        parts += [f"rss {_fmt(self.end_gb, '.1f')}GB", f"delta {_fmt(self.delta_gb, '+.1f')}GB"]
        return " | ".join(parts) + " " + NO_CUDA_NOTE


@contextlib.contextmanager
def gpu_profile(name: str, *, device: torch.device | str | int | None = None, verbose: bool = True) -> Iterator[Profile]:
    """Time a block and measure its peak and net memory; print a one-line summary on exit.

    Args:
        name: label for the printed line.
        device: the CUDA device to measure (default: the current one). Ignored without CUDA.
        verbose: print `Profile.summary()` on exit (default True). The numbers are on the yielded `Profile` either way.

    Yields:
        A `Profile` whose fields are filled in when the block exits, including when it raises.

    Edge cases: with CUDA, the peak counter of `device` is reset on entry (`torch.cuda.reset_peak_memory_stats`),
    so an enclosing `gpu_profile` on the same device reports the peak since the inner one started. Without CUDA,
    timing is plain wall-clock and memory is the process's RSS.

    Example:
        >>> with gpu_profile("forward pass") as prof:   # doctest: +SKIP
        ...     model(tokens)
        [forward pass] 0.45s | peak 12.3GB | delta +2.1GB
    """
    cuda = torch.cuda.is_available()
    prof = Profile(name=name, cuda=cuda)
    if cuda:
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        prof.start_gb = torch.cuda.memory_allocated(dev) / GB
    else:
        prof.start_gb = _rss_gb()
    t0 = time.perf_counter()
    try:
        yield prof
    finally:
        if cuda:
            torch.cuda.synchronize(dev)
            prof.elapsed = time.perf_counter() - t0
            prof.end_gb = torch.cuda.memory_allocated(dev) / GB
            prof.peak_gb = torch.cuda.max_memory_allocated(dev) / GB
        else:
            prof.elapsed = time.perf_counter() - t0
            prof.end_gb = _rss_gb()
            prof.peak_gb = _peak_rss_gb()
        if prof.start_gb is not None and prof.end_gb is not None:
            prof.delta_gb = prof.end_gb - prof.start_gb
        if verbose:
            print(prof.summary())


def memory_stats(device: torch.device | str | int | None = None) -> dict:
    """A memory snapshot in GB: `{"cuda", "device", "allocated", "reserved", "free", "total"}` on every device.

    CUDA (the default when available, or a CUDA `device`): `allocated` is memory held by tensors, `reserved`
    what PyTorch's caching allocator holds, `free` / `total` come from the driver (`torch.cuda.mem_get_info`, so
    `free` also counts other processes' use). CPU (without CUDA, or `device="cpu"`): `allocated` is this
    process's resident memory (RSS, /proc/self/statm), `reserved` its peak RSS (`resource.getrusage`), `free` the
    system's available memory (MemAvailable in /proc/meminfo) and `total` its physical memory (`os.sysconf`);
    None where the platform does not expose one. Values are not rounded.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"cuda": False, "device": str(dev), "allocated": _rss_gb(), "reserved": _peak_rss_gb(),
                "free": _available_gb(), "total": _physical_gb()}
    free, total = torch.cuda.mem_get_info(dev)
    return {
        "cuda": True,
        "device": str(dev),
        "allocated": torch.cuda.memory_allocated(dev) / GB,
        "reserved": torch.cuda.memory_reserved(dev) / GB,
        "free": free / GB,
        "total": total / GB,
    }


def find_cuda_tensors(min_mb: float = 0.0) -> list[tuple[torch.Size, torch.dtype, str, float]]:
    """Every live CUDA tensor the garbage collector can see, largest first, to diagnose leaks after cleanup.

    Returns:
        `(shape, dtype, device, size_mb)` tuples, e.g. `(torch.Size([64, 300, 2304]), torch.bfloat16, 'cuda:0',
        88.47)`, with `size_mb` in MB (10**6 bytes) rounded to 2 decimals, for tensors of at least `min_mb`.
        Always `[]` without CUDA. Tensors reachable only from C++ (e.g. autograd internals) are not seen, and
        views are listed separately from their base, so sizes can double-count shared storage.
    """
    if not torch.cuda.is_available():
        return []
    return _find_tensors("cuda", min_mb)


def bandwidth_report(data_gb: float, elapsed: float) -> str:
    """Format a throughput line: `bandwidth_report(data_gb=4.6, elapsed=0.19)` -> `"4.6GB in 0.19s = 24.2 GB/s"`.

    `data_gb` and `elapsed` are shown with 3 significant digits (whole numbers from 100 up); the rate with 1 decimal.
    Raises ValueError if `elapsed` is not positive or `data_gb` is negative.
    """
    if not elapsed > 0:
        raise ConfigError(f"elapsed must be a positive number of seconds; got {elapsed!r}")
    if not data_gb >= 0:
        raise ConfigError(f"data_gb must be a non-negative number of GB; got {data_gb!r}")
    return f"{_short(data_gb)}GB in {_short(elapsed)}s = {data_gb / elapsed:.1f} GB/s"


def tensor_size_gb(shape: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes a dense tensor of `shape` and `dtype` needs, in GB (10**9 bytes), unrounded.

    `tensor_size_gb((64, 300, 2304))` is 64*300*2304*2 / 1e9 = 0.0884736 (the seed writes it as 0.089).
    An empty shape `()` is a scalar (one element). Raises ValueError for negative or non-integer dimensions.
    """
    dims = tuple(shape)
    bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int) or d < 0]
    if bad:
        raise ConfigError(f"shape must be a sequence of non-negative ints; got {shape!r} (bad entries: {bad})")
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype such as torch.bfloat16; got {dtype!r}")
    return math.prod(dims) * dtype.itemsize / GB


# --- private helpers -------------------------------------------------------------------------------------------


def _find_tensors(device_type: str, min_mb: float = 0.0) -> list[tuple[torch.Size, torch.dtype, str, float]]:
    """The gc scan behind `find_cuda_tensors`, for any device type (tests use "meta", which needs no memory)."""
    found = []
    for obj in gc.get_objects():
        try:
            # type(obj), not isinstance: isinstance reads obj.__class__, which some module proxies warn about.
            if not (issubclass(type(obj), torch.Tensor) and obj.device.type == device_type):
                continue
            size_mb = obj.numel() * obj.element_size() / MB
        except Exception:  # some gc-tracked objects raise on attribute access; they are not what we look for
            continue
        if size_mb >= min_mb:
            found.append((obj.shape, obj.dtype, str(obj.device), round(size_mb, 2)))
    found.sort(key=lambda rec: rec[3], reverse=True)
    return found


def _rss_gb() -> float | None:
    """Current resident set size of this process in GB, from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / GB
    except (OSError, ValueError, IndexError):
        return None


def _available_gb() -> float | None:
    """Memory the system can give new allocations without swapping, in GB (MemAvailable, Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _physical_gb() -> float | None:
    """The system's physical memory in GB; None where `os.sysconf` does not expose it."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    except (ValueError, OSError, AttributeError):
        return None


def _peak_rss_gb() -> float | None:
    """Peak resident set size of this process since it started, in GB; None where `resource` is unavailable."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    return (peak if sys.platform == "darwin" else peak * 1024) / GB


def _short(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fmt(x: float | None, spec: str) -> str:
    return "?" if x is None else format(x, spec)
