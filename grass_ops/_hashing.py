"""Deterministic, platform-independent random structures (SJLT hashes, masks, seeds).

Everything here is a pure function of its integer arguments: it is computed on the CPU with
numpy's wrapping uint64 arithmetic (SplitMix64), never with a device RNG, so the same seed gives
the same tensors on every machine, device, OS and library version.
"""
from __future__ import annotations

import numpy as np
import torch

from ._checks import check_int

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Independent streams so that e.g. sjlt_hash(..., seed=0) and random_mask(..., seed=0) are unrelated.
STREAM_SJLT_BUCKET = 1
STREAM_SJLT_SIGN = 2
STREAM_MASK = 3
STREAM_DERIVE = 4
STREAM_DENSE_SIGNS = 5  # the +-1 entries of the Rademacher matrix and of FJLT's random diagonal


def _check_seed(seed: int) -> int:
    return check_int("seed", seed, minimum=0)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer applied elementwise to a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def hash_stream(seed: int, stream: int, n: int) -> np.ndarray:
    """n pseudo-random uint64 words for (seed, stream): word i = mix(mix(seed, stream) + i)."""
    key = splitmix64(np.array([_check_seed(seed) ^ (stream << 56)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return splitmix64(np.arange(n, dtype=np.uint64) + key)


def derive_seed(seed: int, *tags: int) -> int:
    """A sub-seed for a component of a composite compressor (e.g. the in- and out-masks of FactGraSS)."""
    value = _check_seed(seed)
    for tag in tags:
        value = int(hash_stream(value, STREAM_DERIVE, int(tag) + 1)[-1] >> np.uint64(1))
    return value


def sjlt_hash(p: int, k: int, s: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The SJLT hash of a p -> k projection with s non-zeros per input coordinate.

    Returns ``idx`` [p, s] int64 and ``sign`` [p, s] int8 (+-1). Block construction (Kane & Nelson):
    the k outputs are cut into s contiguous blocks and hash r of coordinate j lands in block r, so
    the s buckets of a coordinate are always distinct. Requires s <= k.
    """
    p, k, s = check_int("p", p), check_int("k", k), check_int("s", s)
    if s > k:
        raise ValueError(f"s must be <= k so that each coordinate gets s distinct buckets, got s={s}, k={k}")
    bounds = np.array([r * k // s for r in range(s + 1)], dtype=np.uint64)  # exact: Python ints
    lo, width = bounds[:-1], bounds[1:] - bounds[:-1]
    words = hash_stream(seed, STREAM_SJLT_BUCKET, p * s).reshape(p, s)
    idx = (lo + words % width).astype(np.int64)
    sign_bits = hash_stream(seed, STREAM_SJLT_SIGN, p * s).reshape(p, s) >> np.uint64(63)
    sign = (1 - 2 * sign_bits.astype(np.int64)).astype(np.int8)
    return torch.from_numpy(idx), torch.from_numpy(sign)


def random_mask(d: int, k: int, seed: int = 0) -> torch.Tensor:
    """k distinct coordinates of [0, d), sorted ascending, as int64 [k] (a Random Mask)."""
    d, k = check_int("d", d), check_int("k", k)
    if k > d:
        raise ValueError(f"k must be <= d for a mask, got k={k}, d={d}")
    keys = hash_stream(seed, STREAM_MASK, d)
    chosen = np.argsort(keys, kind="stable")[:k]
    return torch.from_numpy(np.sort(chosen).astype(np.int64))
