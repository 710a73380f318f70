"""What the benchmark scripts share (scripts/bench_ops.py, scripts/bench_attribution.py, grass-attribute bench):
timing, and the JSON report written at the end."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return text
