"""Model fingerprints for the manifest an Attributor checks a store against.

Two algorithms, chosen by where the weights live and recorded as a prefix: ``sha256:`` hashes CPU
tensors in place (no copy); ``lin64:`` reduces accelerator tensors on their device
with two 64-bit linear hashes (no copy of the weights to the host: for an 8B model on a GPU that
would move 16 GB and take seconds). A store written with one is checked with the same one."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from .records import read_json

_ROW = 1 << 16  # words per row of the hashed view
_CHUNK_ROWS = 256  # rows reduced at once (bounds the int64 temporaries at 128 MiB)
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_KEYS = (0x243F6A8885A308D3, 0x13198A2E03707344)


def _shift_right(z: Tensor, s: int) -> Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift of int64


def _splitmix(z: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic), elementwise."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


_tables: dict[tuple, Tensor] = {}


def _table(key: int, n: int, device) -> Tensor:
    """[n] odd pseudo-random int64 weights for ``key`` (the same on every device)."""
    cache_key = (key, n, str(device))
    if cache_key not in _tables:
        _tables[cache_key] = _splitmix(torch.arange(n, dtype=torch.int64, device=device) ^ key) | 1
    return _tables[cache_key]


@torch.no_grad()
def tensor_digest(t: Tensor) -> tuple[int, ...]:
    """Two 64-bit linear hashes of a tensor's bytes, computed where the tensor lives, in chunks.

    h = sum_r V[r] * sum_i x[r, i] * W[i] (mod 2^64) over the bytes read as 32-bit words x [rows, 2^16],
    with random odd weights: changing any one word always changes h, and unrelated tensors collide
    with probability about 2^-64 per hash."""
    words = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-words.numel()) % (4 * _ROW)
    if pad:
        words = torch.cat([words, words.new_zeros(pad)])
    words = words.view(torch.int32).view(-1, _ROW)
    out = []
    for key in _KEYS:
        w = _table(key, _ROW, words.device)
        total = torch.zeros((), dtype=torch.int64, device=words.device)
        for start in range(0, words.shape[0], _CHUNK_ROWS):
            rows = words[start : start + _CHUNK_ROWS].to(torch.int64)
            v = _splitmix(torch.arange(start, start + rows.shape[0], dtype=torch.int64, device=words.device) ^ ~key) | 1
            total += ((rows * w).sum(1) * v).sum()
        out.append(int(total.item()) & ((1 << 64) - 1))
    return tuple(out)


ALGORITHMS = ("sha256", "lin64")
# A store recorded during training (attribution.integrations.GradientCacheCallback): each row is a gradient at
# the weights of the step that saw it, so the store pins the architecture (names, shapes, dtypes), not values.
DURING_TRAINING = "trainer"


def _full(t: Tensor) -> Tensor:
    """A sharded parameter (a DTensor, e.g. FSDP2's) gathered whole: collective, every rank in the same order."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def model_fingerprint(state: dict[str, Tensor], algorithm: str | None = None) -> str:
    """"<algorithm>:<96-bit hex>" of a state dict's names, shapes, dtypes and values. ``algorithm``:
    "sha256" (in place, for CPU tensors), "lin64" (on the tensors' device), or None: sha256 if every
    tensor is on the CPU, else lin64; DURING_TRAINING ("trainer"): names, shapes and dtypes only."""
    if algorithm is None:
        algorithm = "sha256" if all(t.device.type == "cpu" for t in state.values()) else "lin64"
    if algorithm not in (*ALGORITHMS, DURING_TRAINING):
        raise ValueError(f"fingerprint algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())  # a DTensor's shape: the whole tensor's
        if algorithm != DURING_TRAINING:
            t = _full(t)
        if algorithm == "lin64":
            h.update(repr(tensor_digest(t)).encode())
        elif algorithm == "sha256" and t.numel():
            t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return f"{algorithm}:{h.hexdigest()[:24]}"


def fingerprint_algorithm(fingerprint) -> str | None:
    """The algorithm prefix of a recorded fingerprint (None for an unrecognized one)."""
    head = str(fingerprint).partition(":")[0]
    return head if head in (*ALGORITHMS, DURING_TRAINING) else None


def recorded_algorithm(root: Path | None) -> str | None:
    """The fingerprint algorithm of the store at ``root`` (None: no store or no manifest yet), so a model
    is checked against a store with the algorithm the store used."""
    if root is None or not (root / "manifest.json").is_file():
        return None
    recorded = read_json(root / "manifest.json", "manifest")
    if isinstance(recorded, dict) and isinstance(recorded.get("model_fingerprints"), list) and recorded["model_fingerprints"]:
        return fingerprint_algorithm(recorded["model_fingerprints"][0])
    return None


def signature(manifest: dict) -> str:
    """What query features must share with the Attributor that scores them: the manifest but the Fisher."""
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "fisher"},
                                     sort_keys=True).encode()).hexdigest()[:24]
