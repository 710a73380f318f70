"""Gradient compressors with one interface, each a pure function of its recorded seed and shapes.

Every compressor is an ``nn.Module`` (``.to(device)`` moves its buffers) with

* ``compress(g)``: g [..., p] -> [..., k] (``forward`` is the same);
* ``in_features`` (p) and ``out_features`` (k);
* ``spec()``: a JSON-serializable dict (type, shapes, seed, ...) and ``from_spec(spec)`` to rebuild it,
  so a cache can record how it was made and be checked against a configuration.

Every compressor is linear, and ``adjoint(z)``: z [..., k] -> [..., p] is its transpose
(<compress(g), z> = <g, adjoint(z)>), differentiable in z with ``compress`` as its vector-Jacobian product.

Factorized compressors (``FactGraSS``, ``LoGra``) also take a linear layer's factors directly:
``compress_factors(x_in [B, T, d_in], g_out [B, T, d_out]) -> [B, k]``, and their ``compress`` takes the
flattened weight gradient in (d_in, d_out) row-major order (position i * d_out + j), i.e. ``W.grad.T``.
``sketch_output(y, x_in, z)`` is the in-backward form of ``compress_factors`` (see its docstring).
"""
from __future__ import annotations

import abc
import hashlib
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import accumulation_dtype, check_int
from ._hashing import STREAM_DENSE_SIGNS, derive_seed, hash_stream, random_mask, sjlt_hash
from .atomic_files import atomic_writer
from .ops import factgrass, sjlt
from .ops._factors import as_3d

_REGISTRY: dict[str, type["Compressor"]] = {}


def _register(cls):
    _REGISTRY[cls.__name__] = cls
    return cls


def from_spec(spec: dict) -> "Compressor":
    """Rebuild a compressor from :meth:`Compressor.spec` (raises on unknown types or bad fields)."""
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown compressor type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind]._from_spec(spec)


def _check_last_dim(name: str, g: Tensor, p: int) -> None:
    if g.shape[-1] != p:
        raise ValueError(f"{name} expects inputs [..., {p}], got shape {tuple(g.shape)}")


class Compressor(nn.Module, metaclass=abc.ABCMeta):
    """Base class: maps [..., in_features] -> [..., out_features]."""

    in_features: int
    out_features: int

    @abc.abstractmethod
    def spec(self) -> dict:
        """JSON-serializable description: {"type": class name, shapes, seed, ...}."""

    @classmethod
    def _from_spec(cls, spec: dict) -> "Compressor":
        return cls(**{k: v for k, v in spec.items() if k != "type"})

    def compress(self, g: Tensor) -> Tensor:
        return self(g)

    @abc.abstractmethod
    def adjoint(self, z: Tensor) -> Tensor:
        """z [..., out_features] -> [..., in_features], the transpose of the compression."""

    def extra_repr(self) -> str:
        return json.dumps(self.spec())


@_register
class Identity(Compressor):
    def __init__(self, p: int):
        super().__init__()
        self.in_features = self.out_features = check_int("p", p)

    def forward(self, g: Tensor) -> Tensor:
        _check_last_dim("Identity", g, self.in_features)
        return g

    def adjoint(self, z: Tensor) -> Tensor:
        return z

    def spec(self) -> dict:
        return {"type": "Identity", "p": self.in_features}


@_register
class SJLT(Compressor):
    """Sparse JL transform with s non-zeros per column (the ``grass::sjlt`` op)."""

    def __init__(self, p: int, k: int, s: int = 1, seed: int = 0):
        super().__init__()
        idx, sign = sjlt_hash(p, k, s, seed)  # validates p, k, s and seed
        self.in_features, self.out_features, self.s, self.seed = int(p), int(k), int(s), int(seed)
        if k <= torch.iinfo(torch.int32).max:  # 5 bytes a coordinate with the signs, not 9 (the op's scatter indices
            idx = idx.to(torch.int32)          # are int64 buckets, built once per hash and cached)
        self.register_buffer("idx", idx, persistent=False)
        self.register_buffer("sign", sign, persistent=False)

    def forward(self, g: Tensor) -> Tensor:
        return sjlt(g, self.idx, self.sign, self.out_features)

    def adjoint(self, z: Tensor) -> Tensor:
        """In plain torch ops (a signed gather), unlike the ``grass::sjlt_transpose`` op: torch.func can
        differentiate it inside torch.compile (its vector-Jacobian product is the SJLT as an index_add)."""
        _check_last_dim("SJLT.adjoint", z, self.out_features)
        p, s = self.idx.shape
        gathered = z.index_select(-1, self.idx.reshape(-1)).unflatten(-1, (p, s))
        out = (gathered * self.sign.to(z.dtype)).sum(-1)
        return out * s**-0.5 if s > 1 else out

    def spec(self) -> dict:
        return {"type": "SJLT", "p": self.in_features, "k": self.out_features, "s": self.s, "seed": self.seed}


class _Mask(Compressor):
    """Keeps the coordinates ``indices`` (sorted, distinct) of a [..., p] input."""

    def _set_indices(self, p: int, indices: Tensor, source: str = "mask") -> None:
        """``source`` names where the indices come from in error messages (e.g. the mask file)."""
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"{source}: indices must be a 1-D integer tensor, got shape {tuple(indices.shape)} and dtype {indices.dtype}")
        indices = indices.to(torch.int64)
        if indices.numel() == 0 or int(indices.min()) < 0 or int(indices.max()) >= p:
            raise ValueError(f"{source}: indices must be non-empty and lie in [0, {p})")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"{source}: indices must be distinct")
        self.in_features, self.out_features = int(p), int(indices.numel())
        self.register_buffer("indices", indices.sort().values, persistent=False)

    def forward(self, g: Tensor) -> Tensor:
        _check_last_dim(type(self).__name__, g, self.in_features)
        return g.index_select(-1, self.indices)

    def adjoint(self, z: Tensor) -> Tensor:
        _check_last_dim(f"{type(self).__name__}.adjoint", z, self.out_features)
        return z.new_zeros(*z.shape[:-1], self.in_features).index_copy(-1, self.indices, z)


@_register
class RandomMask(_Mask):
    def __init__(self, p: int, k: int, seed: int = 0):
        super().__init__()
        indices = random_mask(p, k, seed)  # validates p, k and seed
        self.seed = int(seed)
        self._set_indices(p, indices)

    def spec(self) -> dict:
        return {"type": "RandomMask", "p": self.in_features, "k": self.out_features, "seed": self.seed}


def indices_digest(indices: Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices.cpu().numpy().astype("<i8")).tobytes()).hexdigest()[:16]


@_register
class SelectiveMask(_Mask):
    """A learned mask (Selective Mask, paper §3.2), loaded from a file written by :meth:`save`.

    Never falls back to a random mask: a missing file, a wrong p or k, or corrupt indices raise.
    """

    def __init__(self, p: int, path: str | Path | None = None, k: int | None = None, indices: Tensor | None = None,
                 metadata: dict | None = None, digest: str | None = None):
        super().__init__()
        p = check_int("p", p)
        if (path is None) == (indices is None):
            raise ValueError("SelectiveMask needs exactly one of path= (a saved mask) or indices=")
        self.path = None if path is None else str(path)
        if path is not None:
            indices, metadata = self.load_file(path)
            if metadata["p"] != p:
                raise ValueError(f"selective mask {path} was learned for p={metadata['p']}, not p={p}")
        self.metadata = dict(metadata or {})
        self._set_indices(p, indices, source=f"selective mask {path}" if path is not None else "selective mask")
        if k is not None and int(k) != self.out_features:
            raise ValueError(f"selective mask {path or ''} keeps k={self.out_features} coordinates, expected k={k}")
        if digest is not None and digest != indices_digest(self.indices):
            raise ValueError(f"selective mask {path or ''} does not match the recorded digest {digest}")

    @staticmethod
    def save(path: str | Path, indices: Tensor, p: int, **metadata) -> Path:
        """Write indices + JSON metadata to an .npz (no pickle), atomically. The metadata's "p" and "k" are
        always the mask's own (p, and the number of indices): a caller's "p" or "k" is overwritten, so
        that :meth:`load_file` can check them against the indices."""
        path = Path(path)
        indices = torch.as_tensor(indices, dtype=torch.int64).sort().values
        meta = {**metadata, "p": check_int("p", p), "k": int(indices.numel())}
        with atomic_writer(path) as f:
            np.savez(f, indices=indices.cpu().numpy(), metadata=np.array(json.dumps(meta)))
        return path

    @staticmethod
    def load_file(path: str | Path) -> tuple[Tensor, dict]:
        """(indices [k] int64, metadata) from a file written by :meth:`save`. Refuses, naming the file:
        a missing or unreadable file, indices that are not a 1-D integer array, and metadata whose p or k
        disagree with the indices (k = their count, every index in [0, p))."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"selective mask file not found: {path} (refusing to fall back to a random mask)")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "indices" not in data or "metadata" not in data:
                    raise ValueError("needs the arrays 'indices' and 'metadata'")
                indices, metadata = data["indices"], json.loads(str(data["metadata"]))
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a readable selective mask file: {error}") from None
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"{path}: indices must be a 1-D integer array, got shape {indices.shape} and dtype {indices.dtype}")
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: metadata must be a JSON object, got {type(metadata).__name__}")
        for key in ("p", "k"):
            value = metadata.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path}: metadata {key!r} must be an int, got {value!r}")
        if metadata["k"] != indices.size:
            raise ValueError(f"{path}: metadata says k={metadata['k']} but the file holds {indices.size} indices")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= metadata["p"]):
            raise ValueError(f"{path}: indices must lie in [0, p={metadata['p']}) as its metadata says, "
                             f"got values in [{int(indices.min())}, {int(indices.max())}]")
        return torch.from_numpy(indices.astype(np.int64)), metadata

    def spec(self) -> dict:
        return {"type": "SelectiveMask", "p": self.in_features, "k": self.out_features, "path": self.path,
                "digest": indices_digest(self.indices)}

    @classmethod
    def _from_spec(cls, spec: dict) -> "SelectiveMask":
        if spec.get("path") is None:
            raise ValueError("a SelectiveMask spec without a path cannot be rebuilt")
        return cls(spec["p"], path=spec["path"], k=spec["k"], digest=spec.get("digest"))


def _as_mask(mask, p: int, k: int | None, seed: int) -> _Mask:
    if mask is None:
        return RandomMask(p, k, seed)
    if isinstance(mask, _Mask):
        if mask.in_features != p or (k is not None and mask.out_features != k):
            raise ValueError(f"mask must map {p} -> {k} coordinates, got {mask.in_features} -> {mask.out_features}")
        return mask
    return SelectiveMask(p, indices=torch.as_tensor(mask), k=k)


def _mask_from_spec(spec: dict | None):
    return None if spec is None else from_spec(spec)


@_register
class GraSS(Compressor):
    """SJLT_k o Mask_k' (paper §3.3.1): keep k' coordinates, then sparse-project them to k."""

    def __init__(self, p: int, k: int, k_prime: int, s: int = 1, seed: int = 0, mask=None):
        super().__init__()
        p, k, k_prime, s = check_int("p", p), check_int("k", k), check_int("k_prime", k_prime), check_int("s", s)
        self.seed, self.k_prime, self.s = check_int("seed", seed, minimum=0), k_prime, s
        self.mask = _as_mask(mask, p, k_prime, derive_seed(seed, 1))
        self.projection = SJLT(k_prime, k, s, derive_seed(seed, 2))
        self.in_features, self.out_features = int(p), int(k)

    def forward(self, g: Tensor) -> Tensor:
        return self.projection(self.mask(g))

    def adjoint(self, z: Tensor) -> Tensor:
        return self.mask.adjoint(self.projection.adjoint(z))

    def spec(self) -> dict:
        mask = None if isinstance(self.mask, RandomMask) else self.mask.spec()
        return {"type": "GraSS", "p": self.in_features, "k": self.out_features, "k_prime": self.k_prime,
                "s": self.s, "seed": self.seed, "mask": mask}

    @classmethod
    def _from_spec(cls, spec):
        return cls(spec["p"], spec["k"], spec["k_prime"], spec["s"], spec["seed"], _mask_from_spec(spec.get("mask")))


class FactorizedCompressor(Compressor):
    """A compressor for one linear layer's gradient, given as factors (inputs, output gradients)."""

    d_in: int
    d_out: int

    @abc.abstractmethod
    def compress_factors(self, x_in: Tensor, g_out: Tensor) -> Tensor:
        """x_in [B, (T,) d_in], g_out [B, (T,) d_out] -> [B, out_features]."""

    def __call__(self, g: Tensor, g_out: Tensor | None = None) -> Tensor:
        """``comp(g)`` compresses flattened weight gradients [..., d_in * d_out]; ``comp(x_in, g_out)``
        compresses the factors (same as :meth:`compress_factors`)."""
        if g_out is not None:
            return self.compress_factors(g, g_out)
        return super().__call__(g)

    def _weight_gradient(self, g: Tensor) -> Tensor:
        _check_last_dim(type(self).__name__, g, self.d_in * self.d_out)
        return g.reshape(*g.shape[:-1], self.d_in, self.d_out)

    @abc.abstractmethod
    def sketch_output(self, y: Tensor, x_in: Tensor, z: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """The layer output y [B, T, d_out] plus a term that is zero (z is zero) and whose
        vector-Jacobian product w.r.t. z [B, k], for dL/dy = g_out, is ``compress_factors(x_in, g_out)``
        (x_in [B, T, d_in] a constant): differentiating a loss w.r.t. z forms the compressed per-sample
        gradient inside the backward, as soon as g_out exists, without holding x_in or g_out in full.
        ``out_scale`` [d_out]: the product is ``compress_factors(x_in, g_out * out_scale)`` instead (a column
        scaling of the output gradient, e.g. an optimizer's second-moment factor; scale x_in for the inputs).
        Computed in z's dtype; the result has y's dtype."""


@_register
class FactGraSS(FactorizedCompressor):
    """SJLT_k o Mask_{k_in' (x) k_out'} (paper §3.3.2) via the fused ``grass::factgrass`` op."""

    def __init__(self, d_in: int, d_out: int, k: int, k_in: int, k_out: int, seed: int = 0, s: int = 1,
                 in_mask=None, out_mask=None):
        super().__init__()
        self.d_in, self.d_out = check_int("d_in", d_in), check_int("d_out", d_out)
        self.k_in, self.k_out = check_int("k_in", k_in), check_int("k_out", k_out)
        self.seed, self.s = check_int("seed", seed, minimum=0), check_int("s", s)
        self.in_features, self.out_features = self.d_in * self.d_out, check_int("k", k)
        self.in_mask = _as_mask(in_mask, d_in, k_in, derive_seed(seed, 1))
        self.out_mask = _as_mask(out_mask, d_out, k_out, derive_seed(seed, 2))
        self.projection = SJLT(self.k_in * self.k_out, k, s, derive_seed(seed, 3))

    def compress_factors(self, x_in: Tensor, g_out: Tensor) -> Tensor:
        p = self.projection
        return factgrass(x_in, g_out, self.in_mask.indices, self.out_mask.indices, p.idx, p.sign, self.out_features)

    def forward(self, g: Tensor) -> Tensor:
        grad = self._weight_gradient(g)
        masked = grad.index_select(-2, self.in_mask.indices).index_select(-1, self.out_mask.indices)
        return self.projection(masked.flatten(-2))

    def adjoint(self, z: Tensor) -> Tensor:
        masked = self.projection.adjoint(z).unflatten(-1, (self.k_in, self.k_out))
        rows = self.out_mask.adjoint(masked)  # [..., k_in', d_out]
        return self.in_mask.adjoint(rows.transpose(-1, -2)).transpose(-1, -2).flatten(-2)

    def sketch_output(self, y: Tensor, x_in: Tensor, z: Tensor, out_scale: Tensor | None = None) -> Tensor:
        # d/dz of <g_out, index_add(y, mask_out, a @ W(z))> = SJLT(vec(a^T g_out[..., mask_out])), a = x_in[..., mask_in]
        a = as_3d(x_in).index_select(-1, self.in_mask.indices).to(z.dtype)  # [B, T, k_in'], all the backward keeps
        w = self.projection.adjoint(z).unflatten(-1, (self.k_in, self.k_out))  # [B, k_in', k_out']
        if out_scale is not None:  # the kept output columns scaled: the product sees g_out[..., mask_out] * scale
            w = w * out_scale.index_select(0, self.out_mask.indices).to(z.dtype)
        return y.index_add(-1, self.out_mask.indices, torch.bmm(a, w).to(y.dtype))

    def spec(self) -> dict:
        masks = {name: None if isinstance(m, RandomMask) else m.spec()
                 for name, m in (("in_mask", self.in_mask), ("out_mask", self.out_mask))}
        return {"type": "FactGraSS", "d_in": self.d_in, "d_out": self.d_out, "k": self.out_features,
                "k_in": self.k_in, "k_out": self.k_out, "seed": self.seed, "s": self.s, **masks}

    @classmethod
    def _from_spec(cls, spec):
        return cls(spec["d_in"], spec["d_out"], spec["k"], spec["k_in"], spec["k_out"], spec["seed"], spec["s"],
                   _mask_from_spec(spec.get("in_mask")), _mask_from_spec(spec.get("out_mask")))


def _dense_shape(p, k, seed) -> tuple[int, int, int]:
    return check_int("p", p), check_int("k", k), check_int("seed", seed, minimum=0)


def gaussian_matrix(k: int, p: int, seed: int, dtype=torch.float32) -> Tensor:
    """[k, p] i.i.d. N(0, 1/k), generated on the CPU from ``seed`` (same on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(k, p, generator=gen, dtype=dtype) / math.sqrt(k)


@_register
class Gaussian(Compressor):
    """Dense Gaussian projection (O(pk) per vector), P_ij ~ N(0, 1/k)."""

    def __init__(self, p: int, k: int, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.seed = _dense_shape(p, k, seed)
        self.register_buffer("matrix", gaussian_matrix(k, p, seed), persistent=False)

    def forward(self, g: Tensor) -> Tensor:
        _check_last_dim("Gaussian", g, self.in_features)
        acc = accumulation_dtype(g.dtype)
        return (g.to(acc) @ self.matrix.to(acc).T).to(g.dtype)

    def adjoint(self, z: Tensor) -> Tensor:
        _check_last_dim(f"{type(self).__name__}.adjoint", z, self.out_features)
        acc = accumulation_dtype(z.dtype)
        return (z.to(acc) @ self.matrix.to(acc)).to(z.dtype)

    def spec(self) -> dict:
        return {"type": "Gaussian", "p": self.in_features, "k": self.out_features, "seed": self.seed}


@_register
class Rademacher(Gaussian):
    """Dense +-1/sqrt(k) projection, signs from the platform-independent hash."""

    def __init__(self, p: int, k: int, seed: int = 0):
        Compressor.__init__(self)
        self.in_features, self.out_features, self.seed = _dense_shape(p, k, seed)
        bits = (hash_stream(seed, STREAM_DENSE_SIGNS, k * p) >> np.uint64(63)).astype(np.float32).reshape(k, p)
        self.register_buffer("matrix", torch.from_numpy((1 - 2 * bits) / math.sqrt(k)), persistent=False)

    def spec(self) -> dict:
        return {**super().spec(), "type": "Rademacher"}


def _hadamard_matrix(n: int, dtype, device) -> Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_transform(x: Tensor, block: int = 128) -> Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (a power of two).

    H_n = H_a (x) H_b (x) ... with factors of at most ``block``: applied as small dense GEMMs along the
    axes of a reshaped view, O(n * sum of the factors) flops at GEMM speed (a radix-2 butterfly in
    torch ops is O(n log n) flops but one full pass over memory per level)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {n}")
    factors = []
    rest = n
    while rest > 1:
        factors.append(min(rest, block))
        rest //= factors[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, *factors) if factors else x.reshape(-1, 1)
    for axis, size in enumerate(factors, start=1):
        h = _hadamard_matrix(size, x.dtype, x.device)
        y = torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)
    return (y.reshape(*lead, n) * n**-0.5)


@_register
class FJLT(Compressor):
    """Fast JL transform: random signs, Hadamard transform, subsample k of n = 2^ceil(log2 p) rows."""

    def __init__(self, p: int, k: int, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.seed = p, k, seed = _dense_shape(p, k, seed)
        self.n = 1 << max(0, (p - 1).bit_length())
        if k > self.n:
            raise ValueError(f"FJLT needs k <= {self.n} (the padded dimension), got k={k}")
        bits = hash_stream(derive_seed(seed, 1), STREAM_DENSE_SIGNS, p) >> np.uint64(63)
        self.register_buffer("signs", torch.from_numpy(1 - 2 * bits.astype(np.float32)), persistent=False)
        self.register_buffer("rows", random_mask(self.n, k, derive_seed(seed, 2)), persistent=False)

    def forward(self, g: Tensor) -> Tensor:
        _check_last_dim("FJLT", g, self.in_features)
        work = g.to(accumulation_dtype(g.dtype)) * self.signs
        work = torch.nn.functional.pad(work, (0, self.n - self.in_features))
        out = hadamard_transform(work).index_select(-1, self.rows) * math.sqrt(self.n / self.out_features)
        return out.to(g.dtype)

    def adjoint(self, z: Tensor) -> Tensor:
        _check_last_dim("FJLT.adjoint", z, self.out_features)
        rows = z.to(accumulation_dtype(z.dtype)) * math.sqrt(self.n / self.out_features)
        padded = rows.new_zeros(*z.shape[:-1], self.n).index_copy(-1, self.rows, rows)
        return (hadamard_transform(padded)[..., : self.in_features] * self.signs).to(z.dtype)  # H is symmetric

    def spec(self) -> dict:
        return {"type": "FJLT", "p": self.in_features, "k": self.out_features, "seed": self.seed}


@_register
class LoGra(FactorizedCompressor):
    """LoGra (Choe et al. 2024): factorized Gaussian projection P_in (x) P_out, k = k_in * k_out."""

    def __init__(self, d_in: int, d_out: int, k_in: int, k_out: int, seed: int = 0):
        super().__init__()
        self.d_in, self.d_out = check_int("d_in", d_in), check_int("d_out", d_out)
        self.k_in, self.k_out, self.seed = check_int("k_in", k_in), check_int("k_out", k_out), check_int("seed", seed, minimum=0)
        self.in_features, self.out_features = self.d_in * self.d_out, self.k_in * self.k_out
        self.register_buffer("p_in", gaussian_matrix(k_in, d_in, derive_seed(seed, 1)), persistent=False)
        self.register_buffer("p_out", gaussian_matrix(k_out, d_out, derive_seed(seed, 2)), persistent=False)

    def compress_factors(self, x_in: Tensor, g_out: Tensor) -> Tensor:
        x_in, g_out = as_3d(x_in), as_3d(g_out)
        acc = accumulation_dtype(x_in.dtype)
        a = x_in.to(acc) @ self.p_in.to(acc).T  # [B, T, k_in]
        b = g_out.to(acc) @ self.p_out.to(acc).T  # [B, T, k_out]
        return torch.bmm(a.transpose(1, 2), b).flatten(1).to(x_in.dtype)

    def forward(self, g: Tensor) -> Tensor:
        acc = accumulation_dtype(g.dtype)
        grad = self._weight_gradient(g).to(acc)
        return (self.p_in.to(acc) @ grad @ self.p_out.to(acc).T).flatten(-2).to(g.dtype)

    def adjoint(self, z: Tensor) -> Tensor:
        acc = accumulation_dtype(z.dtype)
        w = z.to(acc).unflatten(-1, (self.k_in, self.k_out))
        return (self.p_in.to(acc).T @ w @ self.p_out.to(acc)).flatten(-2).to(z.dtype)

    def sketch_output(self, y: Tensor, x_in: Tensor, z: Tensor, out_scale: Tensor | None = None) -> Tensor:
        # d/dz of <g_out, y + (a @ Z) @ P_out> = vec(a^T (g_out @ P_out^T)), a = x_in @ P_in^T
        a = as_3d(x_in).to(z.dtype) @ self.p_in.to(z.dtype).T  # [B, T, k_in]
        w = z.unflatten(-1, (self.k_in, self.k_out))
        p_out = self.p_out.to(z.dtype) if out_scale is None else self.p_out.to(z.dtype) * out_scale.to(z.dtype)
        return y + (torch.bmm(a, w) @ p_out).to(y.dtype)

    def spec(self) -> dict:
        return {"type": "LoGra", "d_in": self.d_in, "d_out": self.d_out, "k_in": self.k_in, "k_out": self.k_out,
                "seed": self.seed}


@_register
class Whitened(FactorizedCompressor):
    """A linear layer's gradient G [d_in, d_out] in another basis, scaled elementwise, then compressed:

        compress(G) = inner(vec((B_in^T G B_out) * S))

    with bases ``in_basis`` B_in [d_in, m_in] and ``out_basis`` B_out [d_out, m_out] (e.g. the leading
    eigenvectors of a layer's K-FAC factors), ``scale`` S [m_in, m_out] and ``inner`` any compressor of
    m_in * m_out inputs. With orthonormal bases and S = (Lambda + lambda)^-1/2 it compresses the whitened
    gradient P^-1/2 g of a Kronecker-factored curvature P, from the factors: B_in^T G B_out =
    sum_t (B_in^T x_t)(B_out^T g_t)^T, so the full gradient is never formed (m_in x m_out per sample).

    The bases are data, not a seed: :meth:`spec` records their sha256 (``basis_digest``) and
    ``from_spec`` refuses to rebuild one without them."""

    def __init__(self, inner: Compressor, in_basis: Tensor, out_basis: Tensor, scale: Tensor):
        super().__init__()
        if in_basis.dim() != 2 or out_basis.dim() != 2 or scale.dim() != 2:
            raise ValueError("in_basis [d_in, m_in], out_basis [d_out, m_out] and scale [m_in, m_out] must be matrices")
        (d_in, m_in), (d_out, m_out) = in_basis.shape, out_basis.shape
        if tuple(scale.shape) != (m_in, m_out):
            raise ValueError(f"scale must be [m_in, m_out] = [{m_in}, {m_out}], got {tuple(scale.shape)}")
        if inner.in_features != m_in * m_out:
            raise ValueError(f"inner takes {inner.in_features} inputs, not m_in * m_out = {m_in * m_out}")
        for name, t in (("in_basis", in_basis), ("out_basis", out_basis), ("scale", scale)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be a finite floating-point matrix")
        self.d_in, self.d_out, self.m_in, self.m_out = d_in, d_out, m_in, m_out
        self.in_features, self.out_features = d_in * d_out, inner.out_features
        self.inner = inner
        self.register_buffer("in_basis", in_basis.detach().clone(), persistent=False)
        self.register_buffer("out_basis", out_basis.detach().clone(), persistent=False)
        self.register_buffer("scale", scale.detach().clone(), persistent=False)
        digest = hashlib.sha256()
        for t in (in_basis, out_basis, scale):
            digest.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        self.basis_digest = digest.hexdigest()

    def _parts(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return self.in_basis.to(dtype), self.out_basis.to(dtype), self.scale.to(dtype)

    def compress_factors(self, x_in: Tensor, g_out: Tensor) -> Tensor:
        x_in, g_out = as_3d(x_in), as_3d(g_out)
        acc = accumulation_dtype(x_in.dtype)
        b_in, b_out, scale = self._parts(acc)
        rotated = torch.bmm((x_in.to(acc) @ b_in).transpose(1, 2), g_out.to(acc) @ b_out)  # [B, m_in, m_out]
        return self.inner((rotated * scale).flatten(1)).to(x_in.dtype)

    def forward(self, g: Tensor) -> Tensor:
        acc = accumulation_dtype(g.dtype)
        b_in, b_out, scale = self._parts(acc)
        rotated = b_in.T @ self._weight_gradient(g).to(acc) @ b_out
        return self.inner((rotated * scale).flatten(-2)).to(g.dtype)

    def adjoint(self, z: Tensor) -> Tensor:
        acc = accumulation_dtype(z.dtype)
        b_in, b_out, scale = self._parts(acc)
        w = self.inner.adjoint(z.to(acc)).unflatten(-1, (self.m_in, self.m_out)) * scale
        return (b_in @ w @ b_out.T).flatten(-2).to(z.dtype)

    def sketch_output(self, y: Tensor, x_in: Tensor, z: Tensor, out_scale: Tensor | None = None) -> Tensor:
        # d/dz of <g_out, y + ((x B_in) W(z)) B_out^T> = inner(vec((B_in^T x^T g_out B_out) * S)), W = inner^T(z) * S
        b_in, b_out, scale = self._parts(z.dtype)
        if out_scale is not None:
            b_out = b_out * out_scale.to(z.dtype)[:, None]
        a = as_3d(x_in).to(z.dtype) @ b_in  # [B, T, m_in]: all the backward keeps of the layer's inputs
        w = self.inner.adjoint(z).unflatten(-1, (self.m_in, self.m_out)) * scale
        return y + (torch.bmm(a, w) @ b_out.T).to(y.dtype)

    def spec(self) -> dict:
        return {"type": "Whitened", "d_in": self.d_in, "d_out": self.d_out, "m_in": self.m_in, "m_out": self.m_out,
                "inner": self.inner.spec(), "basis_digest": self.basis_digest}

    @classmethod
    def _from_spec(cls, spec):
        raise ValueError(f"a Whitened compressor's bases are data (sha256 {spec.get('basis_digest')}), not a seed: "
                         "rebuild it with Whitened(inner, in_basis, out_basis, scale)")


__all__ = [
    "Compressor", "FactorizedCompressor", "Identity", "SJLT", "RandomMask", "SelectiveMask", "GraSS",
    "FactGraSS", "Gaussian", "Rademacher", "FJLT", "LoGra", "Whitened", "from_spec", "hadamard_transform",
]
