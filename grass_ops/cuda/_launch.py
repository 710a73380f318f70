"""What every launcher shares: the deterministic switch, the device guard, grid limits, and the
vocabulary of the ahead-of-time (AOT) tables. Imports no triton."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

# CUDA caps grid dimensions y and z at 65535 (x at 2**31 - 1). Launchers put rows on y and cut them
# into chunks of at most this many row blocks (the tests lower it to exercise the chunking).
MAX_GRID_Y = 65535

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton paths take (float64 uses torch)
INDEX_DTYPES = (torch.int64, torch.int32)


def deterministic_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given; else ``torch.are_deterministic_algorithms_enabled()`` or ``GRASS_OPS_DETERMINISTIC=1``."""
    if flag is not None:
        return bool(flag)
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("GRASS_OPS_DETERMINISTIC") == "1"


def device_guard(device: torch.device):
    """Launch on ``device`` (a tensor on cuda:1 while cuda:0 is current); nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def row_chunks(n_rows: int, rows_per_program: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges whose row blocks fit grid axis y (at most ``MAX_GRID_Y`` of
    ``rows_per_program`` rows). Chunks start at multiples of 16 rows, so slices of an aligned
    row-major tensor stay 16-byte aligned and launch the same specialization."""
    blocks = MAX_GRID_Y - MAX_GRID_Y % 16
    step = blocks * rows_per_program
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for CPU tensors (the interpreter runs programs serially)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- AOT tables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorArg:
    """Stands for a tensor argument in an AOT table: its dtype and whether its address is 16-byte
    aligned (Triton specializes pointers on that). Has what Triton's specializer reads."""

    dtype: torch.dtype
    aligned: bool = True

    def data_ptr(self) -> int:
        return 0 if self.aligned else 4


@dataclass(frozen=True)
class AotVariant:
    """One specialization a launcher can produce: the kernel, its positional arguments (TensorArg for
    tensors, ints and floats as the launcher passes them), its constexprs and launch options."""

    kernel: object
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    label: str = ""


# Values that fall in each class Triton specializes an int argument on (do_not_specialize ints only
# distinguish i32 from i64): equal to 1, divisible by 16, neither, and past int32 (i64).
INT_ONE, INT_DIV16, INT_ODD, INT_I64 = 1, 4096, 4097, 2**31 + 1


def one_at_a_time(base: dict, alternatives: dict) -> Iterator[tuple[str, dict]]:
    """``base`` and, for each name in ``alternatives``, each alternative value with the rest at base:
    every specialization class of every argument is compiled at least once."""
    yield "base", dict(base)
    for name, values in alternatives.items():
        for value in values:
            yield f"{name}={_short(value)}", {**base, name: value}


def _short(value) -> str:
    if isinstance(value, TensorArg):
        return f"{str(value.dtype).removeprefix('torch.')}{'' if value.aligned else '@unaligned'}"
    return {INT_I64: "2**31+1"}.get(value, str(value))
