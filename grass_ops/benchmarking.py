"""What the benchmark scripts share (scripts/bench_ops.py, scripts/bench_attribution.py, grass-attribute bench,
scripts/predict_memory.py): timing, peak tensor memory, and the JSON report written at the end."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import weakref
from pathlib import Path
from typing import Callable

import torch

from ._compat import TorchDispatchMode, tree_leaves
from .atomic_files import write_text_atomic


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2, device: torch.device | str | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, synchronizing CUDA."""
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def emit_json_report(report: dict, out: str | os.PathLike | None = None, quiet: bool = False) -> str:
    """Print ``report`` as indented JSON on stdout (unless ``quiet``) and, when ``out`` is given, also
    write it there (parent folders created; written to a temporary file and renamed, so a killed run
    never leaves a truncated report). Returns the JSON text."""
    text = json.dumps(report, indent=1)
    if not quiet:
        print(text)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return text


class PeakMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storage inside the block (a dispatch mode: it sees every op's
    outputs below autograd and torch.func, real or fake tensors alike, so a fake-tensor run of a model
    predicts what a real run allocates). ``track(t)`` adds tensors made before the block (weights,
    inputs). Counts storages, not the caching allocator's blocks: a GPU's max_memory_allocated can
    differ by rounding and by kernels' workspaces."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes = weakref.WeakKeyDictionary()

    def track(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            if storage in self._sizes:
                continue
            size = self._sizes[storage] = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
        return out


@contextlib.contextmanager
def timed_phase(seconds: dict[str, float], name: str):
    """Adds the wall time of the block to ``seconds[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def process_seconds() -> float | None:
    """Wall seconds since this process started (Linux: /proc/self's creation time), else None."""
    try:
        return time.time() - os.stat("/proc/self").st_ctime
    except OSError:
        return None


def _glibc_function(name: str):
    """The C library's function ``name`` (glibc's malloc_trim, mallopt), or None where there is none."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Free what only reference cycles still hold (``gc.collect()``: a Hugging Face model is such a cycle, and a
    dropped one kept its 0.5 GB until the next full collection, at random in a later phase), then hand the heap's
    free pages back to the OS (glibc ``malloc_trim(0)``), so that a phase's freed tensors do not stay in the resident
    set of the phases after it; True where the trim ran (glibc), False elsewhere."""
    import gc

    gc.collect()
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"  # glibc's own tunable: a user's value is left in force
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fix_mmap_threshold(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap, unmapped when it is freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), unless the user set ``MALLOC_MMAP_THRESHOLD_``. By default glibc raises the
    threshold to the size of each mmapped block that is freed (up to 32 MiB), after which blocks of a few MiB, as a
    transformer's per-parameter gradients, come from the heap and leave it fragmented when freed out of order; a
    fixed threshold keeps them out of it (tail-patch on the main job: a 6-question probe's peak 3,478 -> 3,280 MiB,
    BENCHMARKS.md). True where it was set here, False otherwise (the variable in force, or no glibc)."""
    import os

    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    if MMAP_THRESHOLD_VARIABLE in os.environ:
        return False
    mallopt = _glibc_function("mallopt")
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1)


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_primitive_cache(capacity: int = 64) -> str:
    """Cap oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024) at ``capacity`` primitives
    unless the variable is set already; returns the value in force. oneDNN keeps a primitive per matmul shape
    it has seen, and a job whose batches vary in length (fine-tuning, tail-patch) fills the cache: on the demo's
    tail-patch the resident set grew about 100 MB a question at 1024 and half that at 64, at the same speed (at 0,
    2.5x slower). oneDNN reads the variable when it makes its first primitive: call this before any CPU matmul."""
    import os

    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    return os.environ.setdefault(ONEDNN_CACHE_VARIABLE, str(capacity))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss, kilobytes on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``cmd`` in a fresh process: {"seconds" (wall), "peak_rss_bytes" (the child's ru_maxrss),
    "status", "stdout", "stderr_tail"}. Linux (os.wait4)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=cwd)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        tail = err.read()[-3000:].decode(errors="replace")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "status": os.waitstatus_to_exitcode(status),
            "stdout": out, "stderr_tail": tail}
