"""Every argument check of the grass ops, shared by the torch kernels, the Triton launchers and the
fake (meta) kernels: one ``check_<op>_args`` per op, the backward ops included.

Structural checks (rank, shape, dtype, device) use ``torch._check_*`` (through grass_ops._compat) so they also run under
FakeTensor tracing; value checks (index ranges, signs, distinctness) read data and therefore only
run in the real kernels, cached per unmodified tensor (:class:`IdentityCache`).
"""
from __future__ import annotations

import numbers
import weakref
from typing import Callable

import torch

from ._compat import check_type, check_value

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
INT64_MAX = 2**63 - 1


def check_int(name: str, value, minimum: int = 1, maximum: int = INT64_MAX) -> int:
    """``value`` as an int: a Python or numpy integer (not a bool, not a float) in [minimum, maximum].
    Raises TypeError / ValueError naming ``name``. SymInts (torch.compile's dynamic ints) pass through."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not minimum <= int(value) <= maximum:
        upper = "2**63 - 1 (int64)" if maximum == INT64_MAX else str(maximum)
        raise ValueError(f"{name} must be an int in [{minimum}, {upper}], got {value}")
    return int(value)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other supported float accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor) -> None:
    check_type(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )


def check_index(name: str, t: torch.Tensor, ndim: int) -> None:
    check_type(
        t.dtype in INDEX_DTYPES, lambda: f"{name} must be an int64 (or int32) index tensor, got {t.dtype}"
    )
    check_value(t.dim() == ndim, lambda: f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    check_value(
        all(d == first for d in devices.values()),
        lambda: "all tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()),
    )


def check_hash(idx: torch.Tensor, sign: torch.Tensor, k: int) -> None:
    """idx [p, s] int, sign [p, s] int8, s >= 1, k > 0 (structure only)."""
    check_index("idx", idx, 2)
    check_type(sign.dtype == torch.int8, lambda: f"sign must be int8 (values +-1), got {sign.dtype}")
    check_value(
        sign.shape == idx.shape,
        lambda: f"sign must have idx's shape {tuple(idx.shape)} [p, s], got {tuple(sign.shape)}",
    )
    check_value(k > 0, lambda: f"k must be a positive int, got {k}")
    check_value(idx.shape[1] >= 1, lambda: f"idx must have s >= 1 columns [p, s], got shape {tuple(idx.shape)}")
    check_same_device(idx=idx, sign=sign)


def check_factors(x_in: torch.Tensor, g_out: torch.Tensor) -> None:
    """x_in [B, T, d_in] and g_out [B, T, d_out] (or both 2-D [B, d])."""
    check_float("x_in", x_in)
    check_float("g_out", g_out)
    check_value(
        x_in.dim() in (2, 3), lambda: f"x_in must be [B, T, d_in] or [B, d_in], got shape {tuple(x_in.shape)}"
    )
    check_value(
        g_out.dim() == x_in.dim(),
        lambda: f"g_out must have x_in's rank {x_in.dim()} ([B, T, d_out] or [B, d_out]), got shape {tuple(g_out.shape)}",
    )
    check_value(
        x_in.shape[:-1] == g_out.shape[:-1],
        lambda: f"x_in and g_out must agree on [B, T], got {tuple(x_in.shape)} and {tuple(g_out.shape)}",
    )
    check_type(
        x_in.dtype == g_out.dtype, lambda: f"x_in and g_out must share a dtype, got {x_in.dtype} and {g_out.dtype}"
    )


def check_sjlt_args(x: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor, k: int) -> None:
    """x [..., p] float, plus :func:`check_hash`."""
    check_float("x", x)
    check_value(x.dim() >= 1, lambda: "x must have at least 1 dimension [..., p], got a scalar")
    check_hash(idx, sign, k)
    check_value(
        x.shape[-1] == idx.shape[0],
        lambda: f"x's last dimension ({x.shape[-1]}) must equal idx's first dimension p ({idx.shape[0]})",
    )
    check_same_device(x=x, idx=idx)


def check_sjlt_transpose_args(y: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor) -> None:
    """y [..., k] float, plus :func:`check_hash` with k = y.shape[-1]."""
    check_float("y", y)
    check_value(y.dim() >= 1, lambda: "y must have at least 1 dimension [..., k], got a scalar")
    check_hash(idx, sign, y.shape[-1])
    check_same_device(y=y, idx=idx)


def check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, k) -> None:
    """Factors (:func:`check_factors`), masks in_idx [k_in'] / out_idx [k_out'], hash [k_in' * k_out', s]."""
    check_factors(x_in, g_out)
    check_index("in_idx", in_idx, 1)
    check_index("out_idx", out_idx, 1)
    check_value(
        idx.dim() == 2 and idx.shape[0] == in_idx.shape[0] * out_idx.shape[0],
        lambda: f"idx must be [k_in' * k_out', s] = [{in_idx.shape[0] * out_idx.shape[0]}, s], got {tuple(idx.shape)}",
    )
    check_hash(idx, sign, k)
    check_same_device(x_in=x_in, g_out=g_out, in_idx=in_idx, out_idx=out_idx, idx=idx, sign=sign)


def check_factgrass_backward_args(grad, x_in, g_out, in_idx, out_idx, idx, sign) -> None:
    """grad [B, k] (the cotangent of factgrass's output) plus :func:`check_factgrass_args`."""
    check_float("grad", grad)
    check_value(
        grad.dim() == 2 and grad.shape[0] == x_in.shape[0],
        lambda: f"grad must be [B, k] = [{x_in.shape[0]}, k], got {tuple(grad.shape)}",
    )
    check_factgrass_args(x_in, g_out, in_idx, out_idx, idx, sign, grad.shape[-1])
    check_same_device(grad=grad, x_in=x_in)


def is_hard_mask(mask: torch.Tensor) -> bool:
    """An index mask (int64/int32) rather than float logits."""
    return mask.dtype in INDEX_DTYPES


def check_factorized_mask_args(x_in, g_out, in_mask, out_mask, temperature) -> None:
    """x_in [..., d_in], g_out [..., d_out]; masks both index tensors [k'] or both logits [d]; temperature > 0."""
    check_float("x_in", x_in)
    check_float("g_out", g_out)
    check_value(x_in.dim() >= 1 and g_out.dim() >= 1, lambda: "x_in and g_out must be [..., d] tensors")
    check_value(
        is_hard_mask(in_mask) == is_hard_mask(out_mask),
        lambda: f"in_mask and out_mask must both be index masks or both logits, got {in_mask.dtype} and {out_mask.dtype}",
    )
    for name, mask, t in (("in_mask", in_mask, x_in), ("out_mask", out_mask, g_out)):
        check_value(mask.dim() == 1, lambda: f"{name} must be 1-D, got shape {tuple(mask.shape)}")
        if not is_hard_mask(mask):
            check_float(name, mask)
            check_value(
                mask.shape[0] == t.shape[-1],
                lambda: f"{name} logits must have length {t.shape[-1]} (the factor's last dim), got {mask.shape[0]}",
            )
    check_value(temperature > 0, lambda: f"temperature must be > 0, got {temperature}")
    check_same_device(x_in=x_in, g_out=g_out, in_mask=in_mask, out_mask=out_mask)


def check_factorized_mask_backward_args(grad_x, grad_g, x_in, g_out, in_mask, out_mask, temperature) -> None:
    """grad_x / grad_g shaped like factorized_mask's outputs, plus :func:`check_factorized_mask_args`."""
    check_factorized_mask_args(x_in, g_out, in_mask, out_mask, temperature)
    hard = is_hard_mask(in_mask)
    for name, grad, t, mask in (("grad_x", grad_x, x_in, in_mask), ("grad_g", grad_g, g_out, out_mask)):
        check_float(name, grad)
        expected = (*t.shape[:-1], mask.shape[0]) if hard else tuple(t.shape)
        check_value(
            tuple(grad.shape) == expected, lambda: f"{name} must have shape {expected}, got {tuple(grad.shape)}"
        )
    check_same_device(grad_x=grad_x, grad_g=grad_g, x_in=x_in)


def check_factorized_inner_args(x_a, g_a, x_b, g_b) -> None:
    """Two factor sets (:func:`check_factors`) sharing d_in, d_out and dtype."""
    check_factors(x_a, g_a)
    check_factors(x_b, g_b)
    check_value(
        x_a.shape[-1] == x_b.shape[-1] and g_a.shape[-1] == g_b.shape[-1],
        lambda: f"a and b must share d_in and d_out, got x_a {tuple(x_a.shape)}, x_b {tuple(x_b.shape)}, "
        f"g_a {tuple(g_a.shape)}, g_b {tuple(g_b.shape)}",
    )
    check_type(x_a.dtype == x_b.dtype, lambda: f"a and b must share a dtype, got {x_a.dtype} and {x_b.dtype}")
    check_same_device(x_a=x_a, g_a=g_a, x_b=x_b, g_b=g_b)


def check_factorized_inner_backward_args(grad, x_a, g_a, x_b, g_b) -> None:
    """grad [n_a, n_b] plus :func:`check_factorized_inner_args`."""
    check_factorized_inner_args(x_a, g_a, x_b, g_b)
    check_float("grad", grad)
    expected = (x_a.shape[0], x_b.shape[0])
    check_value(
        tuple(grad.shape) == expected, lambda: f"grad must be [n_a, n_b] = {list(expected)}, got {tuple(grad.shape)}"
    )
    check_same_device(grad=grad, x_a=x_a)


def stream_capturing(*tensors: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured for these tensors' work: no host reads (they would break
    the capture) and nothing cached (a table allocated in the graph's private pool must not outlive it)."""
    return any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing()


def values_readable(t: torch.Tensor) -> bool:
    """Whether value checks may read ``t``: not during CUDA-graph capture; the checks run on the
    uncaptured warm-up calls instead, and nothing computed during capture is cached."""
    return not stream_capturing(t)


def check_sjlt_values(idx: torch.Tensor, sign: torch.Tensor, k: int) -> None:
    """idx in [0, k) and sign in {-1, +1} (reads the data)."""
    if idx.numel() == 0 or not values_readable(idx):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"idx values must lie in [0, k={k}), got values in [{lo}, {hi}]")
    if not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError("sign values must be +1 or -1")


def check_mask_values(name: str, mask: torch.Tensor, d: int) -> None:
    """Hard mask: distinct indices in [0, d) (reads the data)."""
    if mask.numel() == 0:
        raise ValueError(f"{name} must select at least one coordinate")
    if not values_readable(mask):
        return
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi >= d:
        raise ValueError(f"{name} values must lie in [0, {d}), got values in [{lo}, {hi}]")
    if torch.unique(mask).numel() != mask.numel():
        raise ValueError(f"{name} must hold distinct indices, found duplicates")


class IdentityCache:
    """Results derived from tensors (validation, index tables), reused while the very same tensors
    are unmodified (same object, same ``_version``). Holds weak references to the key tensors.

    Compressors pass the same hash and mask tensors at every step; this skips re-reading them.
    * An entry goes when one of its key tensors is freed (its tables with it: a dropped compressor's int64
      bucket tables do not outlive it).
    * Bounded by entries (``capacity``; a model's every layer has a few, so a large model's step must fit;
      beyond it the oldest entry goes) and by the bytes of the tensors the results hold (``max_bytes``; beyond
      it a new table is computed and not kept, so a cyclic step over more tables than fit still reuses
      those kept, and validation results, which hold no bytes, are never pushed out by tables).
    Not cached: results for inference tensors (made under ``torch.inference_mode``: they have no version
    counter, so they are recomputed at every call) and anything computed during CUDA-graph capture.
    Unsupported: in-place edits that bypass the version counter (through ``.data``, a numpy view or
    DLPack) are not seen; the cached result of the tensor as it was is reused. Change hash and mask
    tensors with ordinary in-place ops (``.detach()`` views count too), or call
    :func:`grass_ops.clear_caches` after such an edit.
    """

    def __init__(self, capacity: int = 8192, max_bytes: int = 64 << 20):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.entries: dict[tuple, tuple] = {}  # key -> (weak refs to the key tensors, value, bytes held)
        self.bytes = 0
        self._freed: list[tuple] = []  # keys of entries whose key tensor was freed (weakref callbacks)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self._freed.clear()

    def get(self, tensors: tuple[torch.Tensor, ...], extra, compute: Callable):
        if any(t.is_inference() for t in tensors):
            return compute()
        self._drop_freed()
        key = (tuple((id(t), t._version) for t in tensors), extra)
        hit = self.entries.get(key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
            return hit[1]
        value = compute()  # may itself use the cache (a CSR table built from the bucket table)
        if stream_capturing(*tensors):  # a check skipped or a table allocated in the graph's pool: never reuse it
            return value
        self._drop(key)  # an entry of freed tensors at the same addresses, or one that compute() added
        size = _held_bytes(value)
        if self.bytes + size > self.max_bytes:
            return value
        while len(self.entries) >= self.capacity:
            self._drop(next(iter(self.entries)))
        refs = tuple(weakref.ref(t, lambda _, key=key: self._freed.append(key)) for t in tensors)
        self.entries[key] = (refs, value, size)
        self.bytes += size
        return value

    def _drop(self, key) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]

    def _drop_freed(self) -> None:
        while self._freed:
            key = self._freed.pop()
            entry = self.entries.get(key)
            if entry is not None and any(ref() is None for ref in entry[0]):  # not a live entry added since
                self._drop(key)


def _held_bytes(value) -> int:
    """Bytes of the tensors a cached result holds (a tensor, or a tuple / list of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_held_bytes(v) for v in value)
    return 0


validation_cache = IdentityCache()


def clear_caches() -> None:
    """Forget every cached validation result and index table. Needed only after editing a hash or
    mask tensor in a way its version counter does not see (``.data``, a numpy view, DLPack)."""
    validation_cache.clear()
    _passed_signatures.clear()


def check_sjlt_values_cached(idx: torch.Tensor, sign: torch.Tensor, k: int) -> None:
    validation_cache.get((idx, sign), ("values", k), lambda: check_sjlt_values(idx, sign, k))


def check_mask_values_cached(name: str, mask: torch.Tensor, d: int) -> None:
    validation_cache.get((mask,), ("mask", name, d), lambda: check_mask_values(name, mask, d))


def check_factgrass_values(x_in, g_out, in_idx, out_idx, idx, sign, k) -> None:
    """Mask values and hash values of a factgrass call (cached per unmodified tensors)."""
    check_mask_values_cached("in_idx", in_idx, x_in.shape[-1])
    check_mask_values_cached("out_idx", out_idx, g_out.shape[-1])
    check_sjlt_values_cached(idx, sign, k)


_passed_signatures: set = set()


def signature(*args) -> tuple:
    """Shapes, dtypes and devices of tensors (other arguments as they are): what structural checks read."""
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)


def check_once(check: Callable, *args) -> None:
    """Run a structural ``check(*args)`` unless the same signature already passed it (real kernels only;
    fake kernels call the checks directly). Saves tens of microseconds per call on small problems."""
    key = (check, signature(*args))
    if key in _passed_signatures:
        return
    check(*args)
    if len(_passed_signatures) > 4096:
        _passed_signatures.clear()
    _passed_signatures.add(key)
