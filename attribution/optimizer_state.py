"""Optimizer-aware normalization (TrackStar, Chang et al. 2024; LESS, Xia et al. 2024): every per-sample
gradient is divided by (sqrt(v) + eps) ** power before it is compressed, v being Adam's bias-corrected second moment.

``power`` (``optimizer_power``, default 1) picks the geometry of the inner products:

* 1, TrackStar's: each side divided by sqrt(v) + eps, so a score carries (sqrt(v) + eps) ** -2;
* 0.5, the optimizer step's: a score carries (sqrt(v) + eps) ** -1 once, so <g_q, g_d / (sqrt(v) + eps)> is, up to
  the learning rate, the first-order change of the query's log-probability after one Adam step without momentum on
  document d (LESS's Adam inner product). With GradDot it ranks documents by what tail-patch measures: on the main
  job it predicts each document's own tail-patch with Pearson 0.95, exact (BENCHMARKS.md, "The step's first order").

The state is a PyTorch Adam / AdamW ``optimizer.state_dict()``, a file holding one (``torch.load(...,
weights_only=True)``; e.g. the ``optimizer.pt`` a Hugging Face Trainer checkpoint holds), or a mapping
{parameter name: exp_avg_sq}. A state dict keys its tensors by the index of each parameter in the optimizer's
parameter groups, one after the other. Those indices are matched to the model's parameters by one of these
orders, the one under which every stored ``exp_avg_sq`` has its parameter's shape:

* ``model.parameters()`` (an optimizer built as ``AdamW(model.parameters())``), or the trainable ones only;
* the Hugging Face Trainer's two groups: the trainable parameters with weight decay, then those without, each
  in ``named_parameters()`` order; "without" is what ``Trainer.get_decay_parameter_names`` leaves out (a
  LayerNorm, or a name holding bias / layernorm / rmsnorm / norm), or, as older versions had it, a LayerNorm or
  a bias. The first group must hold as many parameters as the state's first group.

An optimizer built from ``model.named_parameters()`` records each group's ``param_names``; they are used
instead, exactly. Several groups that record no names and are not the Trainer's split are refused: their
order (layer-wise learning rates, say) is not in the state, and in a stack of equal layers the shapes fit
any order.

Two orders that both fit the shapes but give a target parameter different tensors are refused (pass the
mapping). With a ``step`` in a parameter's state, v = exp_avg_sq / (1 - beta2**step), beta2 from its group's
``betas``; a mapping is taken as v itself.

Where the division happens (the same for the cache and the queries, per target block):

* flat compressors (SJLT, masks, GraSS, dense, identity) on a layer, and every ``params=`` block: the
  per-sample gradient is divided elementwise by sqrt(v) + eps, exactly;
* factorized compressors (FactGraSS, LoGra) keep the factorization with Adafactor's rank-1 factors of the
  layer's V = v + eps**2 (weight layout [d_in, d_out]): c = V.mean(1) [d_in], r = V.mean(0) [d_out],
  V ~ c r^T / mean(V), so x_in is scaled by 1 / sqrt(c) and g_out by sqrt(mean(V)) / sqrt(r) before the masks.
  eps enters as eps**2 inside the root (sqrt(v + eps**2) for sqrt(v) + eps: within a factor sqrt(2) of it
  where v ~ eps**2, the same where v >> eps**2), so the factored form is exact for a rank-1 v with eps = 0.

Another power raises both factored scales to it (the rank-1 form of (v + eps**2) ** (-power / 2)) and the exact one
((sqrt(v) + eps) ** -power).

What a store records: ``{"sha256": of eps, the power where it is not 1, and every v used (name, shape, float64
values, in block order), "eps": eps}``, with ``"power"`` where it is not 1, under the manifest's ``optimizer_state``
key (absent without a state), so a store cached with one state or power refuses another one, or none, and a store
cached without refuses one.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .layers import LayerInfo
from .store.records import read_json

DEFAULT_EPS = 1e-8
DEFAULT_POWER = 1.0  # TrackStar's: each gradient divided by sqrt(v) + eps (0.5: the optimizer step's first order)
ARGUMENT = "optimizer_state"
# Trainer.get_decay_parameter_names's name patterns (transformers 4.4x-5.x), searched in the lower-cased name
_NO_DECAY = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))


def _error(message: str) -> ValueError:
    return ValueError(f"{ARGUMENT}: {message}")


def check_argument(state, eps, power: float = DEFAULT_POWER) -> float:
    """The checks that need no model: ``state`` None, a path to an existing file, or a mapping; ``eps`` a finite
    number >= 0 (returned as a float); ``power`` a finite number > 0, and the default (1) without a state. Errors
    name the argument."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"optimizer_eps must be a finite number >= 0, got {eps!r}")
    check_power(power)
    if state is None and power != DEFAULT_POWER:
        raise ValueError(f"optimizer_power={power!r} needs an optimizer_state: it is the power of the division by "
                         "sqrt(v) + eps, and without a state there is no v")
    if state is None:
        return float(eps)
    if isinstance(state, (str, Path)):
        if not Path(state).is_file():
            raise FileNotFoundError(f"{ARGUMENT}: no file {state}")
    elif not isinstance(state, Mapping):
        raise TypeError(f"{ARGUMENT} must be None, an optimizer state_dict(), a {{parameter name: exp_avg_sq}} mapping "
                        f"or the path of a file holding one, got {type(state).__name__}")
    return float(eps)


def load(state) -> Mapping:
    """The state of a path (``torch.load(weights_only=True)`` on the CPU, memory-mapped where the file allows it, so
    that Adam's first moment, half of the file, is never read), or ``state`` itself, checked to be an optimizer
    state_dict (a "state" mapping of exp_avg_sq) or a {name: tensor} mapping."""
    if isinstance(state, (str, Path)):
        path = state
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip file torch.save wrote (mmap needs one): read it whole
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle, zip and weights_only errors have no common type
                raise _error(f"{path} is not a file torch.load(weights_only=True) reads ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, Mapping):
        raise _error(f"expected an optimizer state_dict() or a {{parameter name: exp_avg_sq}} mapping, got "
                     f"{type(state).__name__}")
    if isinstance(state.get("state"), Mapping):
        entries = [e for e in state["state"].values() if isinstance(e, Mapping)]
        if not entries or not any("exp_avg_sq" in e for e in entries):
            keys = sorted({k for e in entries for k in e})
            raise _error(f"the optimizer state holds no 'exp_avg_sq' (its per-parameter keys: {keys}): an Adam or "
                         "AdamW state is needed (SGD, Adafactor and others keep no second moment of this form)")
        return state
    if state and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        return state
    raise _error("expected an optimizer state_dict() (with 'state' and 'param_groups') or a non-empty "
                 "{parameter name: exp_avg_sq tensor} mapping")


def _decays(model: nn.Module, names: list[str], legacy: bool) -> dict[str, bool]:
    """Whether the Hugging Face Trainer decays each parameter (see the module docstring)."""
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}

    def in_norm(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in norms for i in range(1, len(parts)))

    if legacy:
        return {n: not in_norm(n) and "bias" not in n for n in names}
    return {n: not in_norm(n) and not any(p.search(n.lower()) for p in _NO_DECAY) for n in names}


TRAINER_GROUPS = "the Hugging Face Trainer's [decay, no decay] groups"


def _orders(model: nn.Module, group_sizes: list[int] | None) -> list[tuple[str, list[str]]]:
    """(description, parameter names by optimizer index), most likely first: with two groups, the Trainer's."""
    named = list(model.named_parameters())
    every = [n for n, _ in named]
    trainable = [n for n, p in named if p.requires_grad]
    plain = [("model.parameters()", every), ("the trainable parameters", trainable)]
    trainer = []
    for legacy in (False, True):
        decays = _decays(model, trainable, legacy)
        first = [n for n in trainable if decays[n]]
        if group_sizes is None or (len(group_sizes) == 2 and group_sizes[0] == len(first)):
            trainer.append((TRAINER_GROUPS, first + [n for n in trainable if not decays[n]]))
    return trainer + plain if group_sizes is not None and len(group_sizes) == 2 else plain + trainer


def _recorded_names(model: nn.Module, groups) -> tuple[str, list[str]] | None:
    """("the names it records", parameter names by optimizer index) when every group of a state_dict records its
    parameters' names (``param_names``: an optimizer built from ``model.named_parameters()``), each one a name of
    ``model``'s (a tied weight under either of its names); else None."""
    if not isinstance(groups, list) or not groups or not all(isinstance(g.get("param_names"), list) for g in groups):
        return None
    canonical = {}
    for name, p in model.named_parameters():
        canonical[id(p)] = name
    aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    order = []
    for group in groups:
        if len(group["param_names"]) != len(group["params"]):
            raise _error(f"a parameter group records {len(group['param_names'])} names for {len(group['params'])} "
                         "parameters")
        order += [_unwrapped(str(n), aliases) for n in group["param_names"]]
    unknown = [n for n in order if n not in aliases]
    if unknown:
        raise _error(f"it names parameters that the model does not have: {unknown[:3]} (also without a wrapper's "
                     f"prefix {list(_WRAPPER_PREFIXES)}): a state of another model?")
    return "the parameter names it records", [aliases[n] for n in order]


# what wrappers put before a parameter's name: DistributedDataParallel, torch.compile, PEFT
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def _unwrapped(name: str, aliases: dict) -> str:
    """``name`` without the wrappers' prefixes it does not have in the model (as recorded when it has none)."""
    while name not in aliases:
        prefix = next((p for p in _WRAPPER_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            return name
        name = name[len(prefix):]
    return name


def _indexed(model: nn.Module, state: Mapping, wanted: list[str]) -> dict[str, tuple[Tensor, float | None]]:
    """{name: (exp_avg_sq, bias correction or None)} of a state_dict, for the ``wanted`` parameter names."""
    groups = state.get("param_groups")
    entries = state["state"]
    if isinstance(groups, list) and all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        indices = [i for g in groups for i in g["params"]]
        group_of = {i: g for g in groups for i in g["params"]}
        sizes = [len(g["params"]) for g in groups]
    else:
        indices, group_of, sizes = sorted(entries), {}, None
    position = {index: p for p, index in enumerate(indices)}
    params = dict(model.named_parameters())
    named_order = _recorded_names(model, groups)
    orders = [named_order] if named_order is not None else _orders(model, sizes)
    if named_order is None and sizes is not None and len(sizes) > 1:
        orders = [(how, order) for how, order in orders if how == TRAINER_GROUPS]  # a plain order is not known there
        if not orders:
            raise _error(f"its {len(sizes)} parameter groups (sizes {sizes[:6]}) are not the Hugging Face Trainer's "
                         "[decay, no decay] split, and a state_dict does not record which parameter each index is: "
                         "build the optimizer from model.named_parameters() (torch then records the names), or pass "
                         "a {parameter name: exp_avg_sq} mapping")
    fits = []
    for how, order in orders:
        if sizes is not None and len(order) != len(indices):
            continue
        if all(k in position and position[k] < len(order) and isinstance(e.get("exp_avg_sq"), Tensor)
               and tuple(e["exp_avg_sq"].shape) == tuple(params[order[position[k]]].shape)
               for k, e in entries.items() if isinstance(e, Mapping) and "exp_avg_sq" in e):
            fits.append((how, order))
    if not fits:
        shapes = [tuple(e["exp_avg_sq"].shape) for e in list(entries.values())[:4] if "exp_avg_sq" in e]
        raise _error(f"its {len(indices)} parameters (first shapes {shapes}) match the model's parameters neither in the "
                     "order of model.parameters() nor in the Hugging Face Trainer's groups: a state of another model? "
                     "(or pass a {parameter name: exp_avg_sq} mapping)")
    how, order = fits[0]
    for other, other_order in fits[1:]:
        if any(order.index(n) != other_order.index(n) for n in wanted if n in order and n in other_order):
            raise _error(f"its parameter indices fit both {how} and {other}, which give the target parameters "
                         "different tensors: pass a {parameter name: exp_avg_sq} mapping instead")
    index_of = {name: indices[p] for p, name in enumerate(order)}
    found = {}
    for name in wanted:
        entry = entries.get(index_of.get(name))
        if not isinstance(entry, Mapping):
            raise _error(f"no state for parameter {name!r} (index {index_of.get(name)} in {how}): was it trained?")
        if not isinstance(entry.get("exp_avg_sq"), Tensor):
            raise _error(f"the state of parameter {name!r} has no 'exp_avg_sq' (keys {sorted(entry)}): an Adam or AdamW "
                         "state is needed")
        found[name] = (entry["exp_avg_sq"], _bias_correction(entry, group_of.get(index_of[name]), name))
    return found


def _bias_correction(entry: Mapping, group: Mapping | None, name: str) -> float | None:
    """1 - beta2**step for a state with a step (None without one, or at step 0)."""
    step = entry.get("step")
    if step is None:
        return None
    step = float(step.item() if isinstance(step, Tensor) else step)
    if step <= 0:
        return None
    betas = group.get("betas") if group is not None else None
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise _error(f"parameter {name!r} has a step but its parameter group has no betas (needed for the bias "
                     "correction 1 - beta2**step)")
    return 1.0 - float(betas[1]) ** step


def match(model: nn.Module, state: Mapping, wanted: list[str]) -> dict[str, tuple[Tensor, float | None]]:
    """{parameter name: (its exp_avg_sq as stored, bias correction or None)} for the ``wanted`` names (as
    ``model.named_parameters()`` gives them) of a :func:`load`-ed state: every one present, with its shape."""
    params = dict(model.named_parameters())
    if "state" in state and isinstance(state["state"], Mapping):
        found = _indexed(model, state, wanted)
    else:
        aliases = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        found = {}
        for name in wanted:
            given = next((state[a] for a in aliases[id(params[name])] if a in state), None)
            if given is None:
                raise _error(f"the mapping has no exp_avg_sq for parameter {name!r} (it names {sorted(state)[:5]} ...)")
            found[name] = (given, None)
    for name, (v, _) in found.items():
        if tuple(v.shape) != tuple(params[name].shape):
            raise _error(f"exp_avg_sq of {name!r} has shape {tuple(v.shape)}, the parameter {tuple(params[name].shape)}: "
                         "a state of another model?")
    return found


def second_moment(name: str, v: Tensor, correction: float | None) -> Tensor:
    """The bias-corrected v of one parameter (from :func:`match`), float64 on the CPU, checked finite and >= 0."""
    v = v.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise _error(f"exp_avg_sq of {name!r} holds negative or non-finite values: not a second moment")
    return v / correction if correction is not None else v


@dataclass
class Normalization:
    """The divisions of one model's blocks: ``scales[block]`` is ("exact", 1 / (sqrt(v) + eps) in the block's
    flat layout [p]) or ("factored", x_in scale [d_in], g_out scale [d_out]); ``record`` is what the store keeps."""

    scales: dict[str, tuple]
    record: dict

    def to(self, device, dtype) -> "Normalization":
        return Normalization({n: (s[0], *(t.to(device, dtype) for t in s[1:])) for n, s in self.scales.items()},
                             self.record)


def layer_parameter(model: nn.Module, info: LayerInfo) -> str:
    """The name of a target layer's weight in ``model.named_parameters()``."""
    params = dict(model.named_parameters())
    return next(f"{m}.weight" for m in info.modules if f"{m}.weight" in params)


def check_power(power) -> float:
    """``power`` (optimizer_power) as a float: a finite number > 0, else a ValueError naming it."""
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not math.isfinite(power) or power <= 0:
        raise ValueError(f"optimizer_power must be a finite number > 0 (1: TrackStar's division by sqrt(v) + eps; "
                         f"0.5: the optimizer step's first order), got {power!r}")
    return float(power)


def factored_scales(v: Tensor, eps: float, power: float = DEFAULT_POWER) -> tuple[Tensor, Tensor]:
    """Adafactor's rank-1 form of (v + eps**2) ** (-power / 2) for v [d_in, d_out]: (x_in scale [d_in], g_out scale
    [d_out]) whose outer product is (mean(V) / (c_i r_j)) ** (power / 2), V = v + eps**2, c = V.mean(1),
    r = V.mean(0)."""
    w = v + eps * eps
    c, r = w.mean(1), w.mean(0)
    if not bool((c > 0).all()) or not bool((r > 0).all()):
        raise ValueError("optimizer_eps=0 with a row or column of exp_avg_sq that is all zero divides by zero: "
                         "give optimizer_eps > 0")
    x_scale, g_scale = c.rsqrt(), w.mean().sqrt() * r.rsqrt()
    return (x_scale, g_scale) if power == 1 else (x_scale.pow(power), g_scale.pow(power))


def exact_scale(v: Tensor, eps: float, power: float = DEFAULT_POWER) -> Tensor:
    """1 / (sqrt(v) + eps) ** power, elementwise."""
    if eps == 0 and bool((v == 0).any()):
        raise ValueError("optimizer_eps=0 with zeros in exp_avg_sq divides by zero: give optimizer_eps > 0")
    return 1.0 / (v.sqrt() + eps) if power == 1 else (v.sqrt() + eps).pow(-power)


def normalization(model: nn.Module, state, eps: float, layers: dict[str, LayerInfo], params: list[str],
                  factorized: set[str], power: float = DEFAULT_POWER) -> Normalization | None:
    """The :class:`Normalization` of ``state`` (as :class:`attribution.config.AttributorConfig` holds it; None:
    none) for the target ``layers`` (those in ``factorized`` with Adafactor factors) and the ``params=`` blocks, at
    ``power`` (recorded, and fingerprinted, only where it is not the default 1: a store cached before it existed
    reads back the same record)."""
    if state is None:
        return None
    state = load(state)
    names = {n: layer_parameter(model, info) for n, info in layers.items()}
    names.update({f"param:{p}": p for p in params})
    found = match(model, state, list(dict.fromkeys(names.values())))
    power = check_power(power)
    digest = hashlib.sha256(repr(float(eps)).encode())
    if power != DEFAULT_POWER:
        digest.update(f"power={power!r}".encode())
    scales = {}
    for block, name in names.items():  # one float64 v at a time
        v = second_moment(name, *found[name])
        info = layers.get(block)
        if info is not None:
            v = v.T if info.kind == "linear" else v  # the (d_in, d_out) layout of the per-sample gradient
        digest.update(f"{block}:{name}{tuple(v.shape)}".encode())
        digest.update(v.contiguous().numpy().tobytes())
        if block in factorized:
            scales[block] = ("factored", *factored_scales(v, eps, power))
        else:
            scales[block] = ("exact", exact_scale(v, eps, power).flatten())
    record = {"sha256": digest.hexdigest()[:24], "eps": float(eps)}
    return Normalization(scales, record if power == DEFAULT_POWER else {**record, "power": power})


def check_recorded(root: Path | None, record: dict | None) -> None:
    """A store at ``root`` cached with another optimizer state than ``record`` (or with one where it is None,
    or without one where it is given): a ValueError naming optimizer_state, before the store is opened."""
    if root is None or not (root / "manifest.json").is_file():
        return
    recorded = read_json(root / "manifest.json", "manifest")
    recorded = recorded.get(ARGUMENT) if isinstance(recorded, dict) else None
    if recorded == record:
        return
    if recorded is None:
        raise _error(f"the store {root} was cached without an optimizer state; query it without one, or cache into a "
                     "new store")
    if record is None:
        raise _error(f"the store {root} was cached with an optimizer state (sha256 {recorded.get('sha256')}, eps "
                     f"{recorded.get('eps')}): give the same optimizer_state (--optimizer-state) to query it")
    raise _error(f"the store {root} was cached with another optimizer state (sha256 {recorded.get('sha256')}, eps "
                 f"{recorded.get('eps')}, power {recorded.get('power', DEFAULT_POWER)}; this one: sha256 "
                 f"{record['sha256']}, eps {record['eps']}, power {record.get('power', DEFAULT_POWER)}): give the same "
                 "one (--optimizer-state, --optimizer-power), or cache into a new store")


__all__ = ["DEFAULT_EPS", "DEFAULT_POWER", "Normalization", "check_argument", "check_power", "check_recorded",
           "exact_scale", "factored_scales", "layer_parameter", "load", "match", "normalization", "second_moment"]
