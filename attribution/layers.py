"""Target layers: nn.Linear and Hugging Face GPT-2-style Conv1D (weight [d_in, d_out]).

For both, a layer maps inputs [..., d_in] to outputs [..., d_out], and its per-sample weight
gradient in grass_ops' (d_in, d_out) row-major convention is sum_t x_in[t] (x) g_out[t].
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """HF transformers' Conv1D (GPT-2): y = x @ W + b with W [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_target(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    d_in: int
    d_out: int
    kind: str  # "linear" or "conv1d"

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


def layer_info(name: str, module: nn.Module) -> LayerInfo:
    if isinstance(module, nn.Linear):
        return LayerInfo(name, module.in_features, module.out_features, "linear")
    d_in, d_out = module.weight.shape
    return LayerInfo(name, int(d_in), int(d_out), "conv1d")


def find_layers(model: nn.Module, layers: list[str] | str | None = None) -> dict[str, LayerInfo]:
    """Target layers by name. None: every nn.Linear / Conv1D. A string or list may hold exact names or
    glob patterns ("model.layers.*.mlp.*"). Unknown names raise, listing what exists."""
    candidates = {name: module for name, module in model.named_modules() if is_target(module)}
    if not candidates:
        raise ValueError("the model has no nn.Linear or Conv1D layers to attribute through")
    if layers is None:
        chosen = list(candidates)
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not patterns:
            raise ValueError("layers must name at least one layer (or be None for every linear layer)")
        chosen = []
        for pattern in patterns:
            matches = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                known = ", ".join(list(candidates)[:20])
                raise ValueError(f"layers: {pattern!r} matches no nn.Linear/Conv1D layer; available: {known}")
            chosen.extend(m for m in matches if m not in chosen)
    return {name: layer_info(name, candidates[name]) for name in chosen}
