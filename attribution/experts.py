"""Mixture-of-experts layers held as fused 3-D parameters, attributed per expert with the routing respected.

transformers' fused experts modules (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, gpt-oss, DeepSeek, ...)
hold every expert's projections in one parameter, ``gate_up_proj`` (or ``up_proj`` without a gate) [E, 2I, H]
and ``down_proj`` [E, H, I] ([E, d_in, d_out] when ``is_transposed``, with ``*_bias`` [E, d_out] when
``has_bias``), and are called with the flattened tokens [N, H] and the router's top-k choice ([N, K] expert ids
and weights). No nn.Linear exists per expert, so :func:`attach_views` gives each expert's projection a
parameter-free module, :class:`ExpertProjection`, that the capture hooks like a linear layer (named
``<experts>.per_expert.<projection>.<e>``: the default layers and glob patterns select them).

While a capture runs (:func:`capturing`), the fused module computes through its views instead of its own
kernels: for expert e, the (token, slot) pairs routed to it are laid out per sample, [B, T_e, d] (T_e: the most
pairs any sample routes to e; padding rows are zero and receive no gradient), and pass through e's views;
the outputs are weighted by the router and summed over the slots as transformers' own forward does. Each
view's factors therefore hold exactly the tokens routed to its expert: a token contributes only to its
experts' gradients. Every view runs for every batch (with T_e = 0 when no token chose e), so every block of
the store is defined. Outside a capture the module runs its own forward, untouched.

Not supported (refused): the Kronecker-factored preconditioners and the optimizer normalization over expert
views. Not supported either: experts whose weights are offloaded (accelerate's device_map offload: the views read
the parameters directly). The other layers of an MoE block (Qwen2-MoE's shared expert and its gate) are called on
the block's flattened tokens [B * T, H]: the capture reads those calls as [B, T, H] (:func:`flattened_layers`). A module that holds a
3-D parameter in a layout not recognised here is named and refused by the default layers (never skipped
silently); name the layers to leave it out knowingly.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable

import torch
from torch import Tensor, nn

VIEWS = "per_expert"  # the child ModuleDict of the views
PROJECTIONS = (("gate_up_proj", "up_proj"), ("down_proj",))  # (the first-stage candidates), the second stage
SKIPPED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ExpertProjection(nn.Module):
    """Expert ``expert``'s projection ``param`` of a fused experts module as a layer: [B, T, d_in] -> [B, T, d_out]
    (plus the expert's bias, if any). It holds no parameter (it reads the fused one)."""

    def __init__(self, owner: nn.Module, param: str, expert: int, transposed: bool, bias: bool):
        super().__init__()
        self._owner = [owner]  # not a submodule: the fused module owns the views
        self.param, self.expert, self.transposed, self.bias = param, expert, transposed, bias
        weight = getattr(owner, param)
        d0, d1 = int(weight.shape[1]), int(weight.shape[2])
        self.in_features, self.out_features = (d0, d1) if transposed else (d1, d0)

    def forward(self, x: Tensor) -> Tensor:
        owner = self._owner[0]
        weight = getattr(owner, self.param)[self.expert]
        y = x @ weight if self.transposed else nn.functional.linear(x, weight)
        if self.bias:
            y = y + getattr(owner, f"{self.param}_bias")[self.expert]
        return y

    def extra_repr(self) -> str:
        return f"{self.param}[{self.expert}], in_features={self.in_features}, out_features={self.out_features}"


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused experts module whose layout this module knows."""
    flags = ("is_transposed", "is_concatenated", "has_gate", "has_bias")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in (first, "down_proj"))


def _stages(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def attach_views(model: nn.Module) -> list[str]:
    """Give every fused experts module of ``model`` its views (once); returns the modules' names."""
    found = []
    for name, module in model.named_modules():
        if not is_fused_experts(module):
            continue
        found.append(name)
        if VIEWS in module._modules:
            continue
        experts = int(getattr(module, "down_proj").shape[0])
        module.add_module(VIEWS, nn.ModuleDict({
            p: nn.ModuleList(ExpertProjection(module, p, e, module.is_transposed, module.has_bias) for e in range(experts))
            for p in _stages(module)}))
    return found


def unrecognized(model: nn.Module) -> list[str]:
    """'<module> (<class>): <params>' for each module that looks like it holds experts in a layout not recognised
    here: its class is named like an expert module and holds parameters of 2+ dims, or it holds a stack of
    matrices (a parameter [n > 1, ...] of 3+ dims; convolutions aside, and [1, ...] tensors such as a ViT's
    position embedding)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, SKIPPED_MODULES) or is_fused_experts(module) or isinstance(module, ExpertProjection):
            continue
        own = list(module.named_parameters(recurse=False))
        expert_class = "expert" in type(module).__name__.lower() and not isinstance(module, nn.Linear)
        params = [n for n, p in own if (expert_class and p.dim() >= 2) or (p.dim() >= 3 and p.shape[0] > 1)]
        if params:
            out.append(f"{name or '(root)'} ({type(module).__name__}): {', '.join(params)}")
    return out


def refuse_unrecognized(model: nn.Module) -> None:
    found = unrecognized(model)
    if found:
        raise ValueError(f"the model holds parameters in a layout grass_ops does not recognise as layers or experts: "
                         f"{'; '.join(found[:3])}{' ...' if len(found) > 3 else ''}; their gradients would be left out: "
                         "name the layers to attribute (layers=[...], --layers) to leave them out knowingly")


def owners(model: nn.Module, layer_modules: list[str]) -> list[nn.Module]:
    """The fused experts modules whose views are among ``layer_modules`` (module names)."""
    modules = dict(model.named_modules())
    found = {}
    for name in layer_modules:
        module = modules.get(name)
        if isinstance(module, ExpertProjection):
            owner = module._owner[0]
            found[id(owner)] = owner
    return list(found.values())


def flattened_layers(model: nn.Module, layers: dict) -> set[str]:
    """The target layers (by block name) inside an MoE block, the parent of a fused experts module, other than the
    expert views: transformers' MoE blocks call them (a shared expert and its gate) on the block's flattened tokens
    [B * T, H], which the capture reads as [B, T, H] when they come so."""
    blocks = [name.rpartition(".")[0] for name, module in model.named_modules() if is_fused_experts(module)]
    out = set()
    for name, info in layers.items():
        if info.kind == "expert":
            continue
        if any(m.startswith(f"{b}.") for m in info.modules for b in blocks):
            out.add(name)
    return out


@contextlib.contextmanager
def capturing(modules: list[nn.Module], rows: Callable[[], int | None]):
    """The fused experts ``modules`` compute through their views while the block runs (``rows()``: the batch's
    samples, None outside a capture: then their own forward)."""
    saved = [module.__dict__.get("forward") for module in modules]  # an instance forward (e.g. accelerate's hook)
    for module, own in zip(modules, saved):
        module.forward = types.MethodType(_through_views(own or types.MethodType(type(module).forward, module), rows),
                                          module)
    try:
        yield
    finally:
        for module, own in zip(modules, saved):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own


def _through_views(original: Callable, rows: Callable[[], int | None]) -> Callable:
    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        samples = rows()
        if samples is None:
            return original(hidden_states, top_k_index, top_k_weights)
        return views_forward(self, hidden_states, top_k_index, top_k_weights, samples)

    return forward


def views_forward(module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, samples: int) -> Tensor:
    """transformers' fused experts forward ([N, H], [N, K], [N, K] -> [N, H]) through the expert views, the pairs
    of each expert laid out per sample (see the module docstring)."""
    tokens, slots = top_k_index.shape
    if tokens % samples:
        raise ValueError(f"the experts module got {tokens} tokens for a batch of {samples} samples: it must see the "
                         "batch's tokens flattened sample by sample ([B * T, H])")
    per_sample = tokens // samples * slots  # (token, slot) pairs of one sample
    experts = getattr(module, "down_proj").shape[0]
    ids = top_k_index.reshape(-1)
    pair_x = hidden.repeat_interleave(slots, dim=0)  # [S, H]: pair s = (token s // K, slot s % K)
    sample_of = torch.arange(ids.numel(), device=ids.device) // per_sample
    out = None
    views = module._modules[VIEWS]
    first, second = _stages(module)
    for e in range(experts):
        pairs = torch.nonzero(ids == e).flatten()
        owner = sample_of[pairs]
        counts = torch.bincount(owner, minlength=samples)
        width = int(counts.max()) if pairs.numel() else 0
        position = torch.arange(pairs.numel(), device=ids.device) - (torch.cumsum(counts, 0) - counts)[owner]
        x = pair_x.new_zeros(samples, width, pair_x.shape[-1])
        x[owner, position] = pair_x[pairs]
        h = views[first][e](x)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        valid = torch.zeros(samples, width, 1, dtype=h.dtype, device=h.device)
        valid[owner, position] = 1
        y = views[second][e](h * valid)  # padding rows: zero inputs (a bias or the gate of 0 would not be zero)
        rows = y[owner, position]
        if out is None:
            out = y.new_zeros(ids.numel(), y.shape[-1])
        out = out.index_put((pairs,), rows)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    weighted = out * top_k_weights.reshape(-1, 1).to(out.dtype)
    return weighted.view(tokens, slots, -1).sum(1).to(hidden.dtype)
