"""Per-layer compressors from a spec ("factgrass", "sjlt:s=2", "grass:k_prime=8192", ...).

Factorized compressors (FactGraSS, LoGra) consume the layer's factors directly. Flat ones (SJLT,
masks, GraSS, Gaussian, FJLT, identity) need the per-sample weight gradient, which is formed from
the factors in row chunks (bounded memory) and compressed right away.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import grass_ops
from grass_ops import compressors as C

from .layers import LayerInfo

# name -> builder(layer, k, seed, options) -> Compressor
_BUILDERS: dict[str, Callable] = {}


def _builder(*names):
    def register(fn):
        for name in names:
            _BUILDERS[name] = fn
        return fn

    return register


def _intermediate(d: int, k_sqrt: int, blowup: float) -> int:
    return max(1, min(d, int(round(blowup * k_sqrt))))


def _learned(mask_dir: str | None, layer: LayerInfo, part: str, size: int, k: int | None):
    """A Selective Mask saved by attribution.selective_mask.train_masks (None: use a random mask)."""
    if mask_dir is None:
        return None
    return C.SelectiveMask(size, path=Path(mask_dir) / f"{layer.name}{part}.npz", k=k)


@_builder("factgrass")
def _factgrass(layer: LayerInfo, k: int, seed: int, blowup: float = 2.0, k_in: int | None = None,
               k_out: int | None = None, s: int = 1, mask_dir: str | None = None):
    """k_in' = k_out' = blowup * sqrt(k) (capped at d), as in the paper's FactGraSS. mask_dir: learned
    factorized Selective Masks (<layer>.in.npz / <layer>.out.npz) instead of random ones."""
    root = math.isqrt(k) or 1
    k_in = int(k_in) if k_in else _intermediate(layer.d_in, root, blowup)
    k_out = int(k_out) if k_out else _intermediate(layer.d_out, root, blowup)
    return C.FactGraSS(layer.d_in, layer.d_out, k, k_in, k_out, seed=seed, s=int(s),
                       in_mask=_learned(mask_dir, layer, ".in", layer.d_in, k_in),
                       out_mask=_learned(mask_dir, layer, ".out", layer.d_out, k_out))


@_builder("logra")
def _logra(layer: LayerInfo, k: int, seed: int, k_in: int | None = None, k_out: int | None = None):
    root = math.isqrt(k) or 1
    return C.LoGra(layer.d_in, layer.d_out, int(k_in or min(layer.d_in, root)), int(k_out or min(layer.d_out, root)), seed)


@_builder("sjlt")
def _sjlt(layer, k, seed, s: int = 1):
    return C.SJLT(layer.params, k, int(s), seed)


@_builder("random_mask", "rm")
def _random_mask(layer, k, seed):
    return C.RandomMask(layer.params, k, seed)


@_builder("selective_mask", "sm")
def _selective_mask(layer, k, seed, mask_dir: str | None = None):
    if mask_dir is None:
        raise ValueError("selective_mask needs mask_dir=<directory of masks from attribution.selective_mask.train_masks>")
    return _learned(mask_dir, layer, "", layer.params, k)


@_builder("grass")
def _grass(layer, k, seed, k_prime: int | None = None, blowup: float = 4.0, s: int = 1, mask_dir: str | None = None):
    """SJLT_k o Mask_k'; mask_dir: a learned plain Selective Mask of k' coordinates (GraSS with SM)."""
    k_prime = int(k_prime) if k_prime else min(layer.params, int(blowup * k))
    k_prime = max(k_prime, k)
    return C.GraSS(layer.params, k, k_prime, int(s), seed, mask=_learned(mask_dir, layer, "", layer.params, k_prime))


@_builder("gaussian")
def _gaussian(layer, k, seed):
    return C.Gaussian(layer.params, k, seed)


@_builder("rademacher")
def _rademacher(layer, k, seed):
    return C.Rademacher(layer.params, k, seed)


@_builder("fjlt")
def _fjlt(layer, k, seed):
    return C.FJLT(layer.params, k, seed)


@_builder("identity")
def _identity(layer, k, seed):
    return C.Identity(layer.params)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """"name" or "name:key=value,key=value" -> (name, options)."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in _BUILDERS:
        raise ValueError(f"compressor must be one of {sorted(_BUILDERS)} (optionally 'name:key=value,...'), got {spec!r}")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"compressor option {item!r} in {spec!r} must be key=value")
        options[key.strip()] = _parse_value(value.strip())
    return name, options


def build_compressors(spec, layers: dict[str, LayerInfo], k: int, seed: int) -> dict[str, C.Compressor]:
    """One compressor per layer. ``spec``: a string spec, a Compressor object (shared by every layer of
    its size), a {layer name: Compressor} dict, or a callable
    ``(layer: LayerInfo, k, seed) -> Compressor``. Each layer's seed is derived from ``seed`` and its index;
    k is capped at the layer's parameter count."""
    if isinstance(spec, C.Compressor):  # one compressor object for every layer it fits
        misfits = [n for n, layer in layers.items() if spec.in_features != layer.params]
        if misfits:
            raise ValueError(f"the compressor takes {spec.in_features} inputs but layers {misfits} have other sizes; "
                             "pass a {layer name: Compressor} dict or a factory (LayerInfo, k, seed) -> Compressor")
        spec = {n: spec for n in layers}
    if isinstance(spec, dict):
        missing = [n for n in layers if n not in spec]
        if missing:
            raise ValueError(f"compressor dict has no entry for layers {missing}")
        built = {n: spec[n] for n in layers}
    else:
        if callable(spec):
            make = spec
        else:
            name, options = parse_spec(str(spec))
            make = lambda layer, k_l, s_l: _BUILDERS[name](layer, k_l, s_l, **options)  # noqa: E731
        built = {
            n: make(layer, min(int(k), layer.params), grass_ops.derive_seed(seed, i))
            for i, (n, layer) in enumerate(layers.items())
        }
    for name, comp in built.items():
        if comp.in_features != layers[name].params:
            raise ValueError(f"compressor for {name} takes {comp.in_features} inputs, the layer has {layers[name].params}")
    return built


def weight_gradients(x_in: Tensor, g_out: Tensor) -> Tensor:
    """Per-sample weight gradients [B, d_in * d_out] (row-major (i, j)) from factors [B, (T,) d]."""
    if x_in.dim() == 2:
        return torch.einsum("bi,bj->bij", x_in, g_out).flatten(1)
    return torch.bmm(x_in.transpose(1, 2), g_out).flatten(1)


def compress_layer(comp: C.Compressor, x_in: Tensor, g_out: Tensor, chunk_elements: int = 1 << 25) -> Tensor:
    """[B, k] compressed per-sample gradients of one layer from its factors."""
    if x_in.dim() > 3:  # e.g. [B, heads, T, d]: every leading dim after B is a token dim
        x_in, g_out = x_in.flatten(1, -2), g_out.flatten(1, -2)
    if isinstance(comp, C.FactorizedCompressor):
        return comp.compress_factors(x_in, g_out)
    step = max(1, chunk_elements // max(1, x_in.shape[-1] * g_out.shape[-1]))
    parts = [comp(weight_gradients(x_in[s : s + step], g_out[s : s + step])) for s in range(0, x_in.shape[0], step)]
    return torch.cat(parts) if parts else x_in.new_zeros(0, comp.out_features)
