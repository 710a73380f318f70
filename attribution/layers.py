"""Target layers: nn.Linear and Hugging Face GPT-2-style Conv1D (weight [d_in, d_out]).

For both, a layer maps inputs [..., d_in] to outputs [..., d_out], and its per-sample weight
gradient in grass_ops' (d_in, d_out) row-major convention is sum_t x_in[t] (x) g_out[t].
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from . import experts


def is_conv1d(module: nn.Module) -> bool:
    """HF transformers' Conv1D (GPT-2): y = x @ W + b with W [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_target(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, experts.ExpertProjection)) or is_conv1d(module)


@dataclass(frozen=True)
class LayerInfo:
    """One block: a target layer's weight [d_in, d_out] (grass_ops' orientation) and every module that
    uses it (``modules``: the layer itself, and any module that shares its weight)."""

    name: str
    d_in: int
    d_out: int
    kind: str  # "linear", "conv1d", "expert" (a fused experts module's projection: attribution.experts) or "param"
    modules: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.modules:
            object.__setattr__(self, "modules", (self.name,))

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


def layer_info(name: str, module: nn.Module, modules: tuple[str, ...] = ()) -> LayerInfo:
    if isinstance(module, nn.Linear):
        return LayerInfo(name, module.in_features, module.out_features, "linear", modules)
    if isinstance(module, experts.ExpertProjection):
        return LayerInfo(name, module.in_features, module.out_features, "expert", modules)
    d_in, d_out = module.weight.shape
    return LayerInfo(name, int(d_in), int(d_out), "conv1d", modules)


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of every module that holds it (shared and tied weights included)."""
    owners: dict[int, list[str]] = {}
    for full, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(full.rpartition(".")[0])
    return owners


def adapter_modules(model: nn.Module) -> list[str]:
    """Names of the modules that hold LoRA adapters (peft's LoRA layers: ``lora_A`` and ``lora_B`` module dicts of
    linear layers, one entry per adapter); [] for a model without adapters."""
    return [name for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)]


def _adapter_default(model: nn.Module, candidates: dict[str, nn.Module]) -> list[str]:
    """An adapter model's default layers: its linear layers whose weight is trainable (the LoRA adapters'
    ``lora_A`` / ``lora_B``, and any trainable copy of peft's ``modules_to_save``), the frozen base layers left out.
    Trainable parameters that no linear layer holds (a LoRA on an embedding, DoRA's magnitudes) are refused, named:
    the default would leave their gradients out."""
    chosen = [name for name, module in candidates.items() if module.weight.requires_grad]
    if not chosen:
        raise ValueError("layers=None on a model with LoRA adapters attributes over the adapters' trainable linear "
                         "layers, and none has a trainable weight (an adapter loaded for inference: load it with "
                         "PeftModel.from_pretrained(..., is_trainable=True)), or name the layers to attribute: "
                         "layers=['*.lora_A.*', '*.lora_B.*'] for the adapters, or the base layers' names")
    held = {id(candidates[name].weight) for name in chosen}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held
               and not name.endswith(".bias")]
    if outside:
        raise ValueError(f"the model's adapters train {len(outside)} parameters that no linear layer holds "
                         f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}): layers=None would leave "
                         "their gradients out; name the layers (layers=[...]) and give those parameters as params=[...]")
    return chosen


def find_layers(model: nn.Module, layers: list[str] | str | None = None) -> dict[str, LayerInfo]:
    """Target layers by name. None: every nn.Linear / Conv1D; on a model with LoRA adapters (peft), the linear
    layers with a trainable weight (the adapters' lora_A / lora_B: see :func:`_adapter_default`). A string or list
    may hold exact names or glob patterns ("model.layers.*.mlp.*"; a peft model's base layers are named
    "base_model.model.<name>.base_layer"). Unknown names raise, listing what exists.
    Fused mixture-of-experts modules get one layer per expert and projection (attribution.experts: named
    "<experts>.per_expert.<projection>.<e>"); with None, a 3-D parameter in a layout not recognised is refused."""
    experts.attach_views(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    candidates = {name: module for name, module in modules.items() if is_target(module)}
    if not candidates:
        raise ValueError("the model has no nn.Linear or Conv1D layers to attribute through (to use other "
                         "parameters only, pass layers=[] and params=[...])")
    if layers is None and adapter_modules(model):
        chosen = _adapter_default(model, candidates)
    elif layers is None and getattr(model, "peft_config", None):  # a peft model whose adapters are not LoRA
        kinds = sorted({str(getattr(c, "peft_type", c)) for c in model.peft_config.values()})
        raise ValueError(f"layers=None on a peft model with {', '.join(kinds)} adapters: only LoRA adapters (lora_A / "
                         "lora_B linear layers) have a default; name the layers to attribute (layers=[...], params=[...])")
    elif layers is None:  # every layer, except those used through their weights alone (MultiheadAttention)
        experts.refuse_unrecognized(model)
        chosen = [n for n in candidates if not isinstance(modules.get(n.rpartition(".")[0]), nn.MultiheadAttention)]
    else:
        patterns = [layers] if isinstance(layers, str) else layers
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"layers must be None, a name or a list of names / glob patterns, got {layers!r}")
        if not patterns:
            raise ValueError("layers must name at least one layer (or be None for every linear layer)")
        chosen = []
        for pattern in patterns:
            matches = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                known = ", ".join(list(candidates)[:20])
                raise ValueError(f"layers: {pattern!r} matches no nn.Linear/Conv1D layer or expert; available: {known}")
            chosen.extend(m for m in matches if m not in chosen)
    owners = _owners(model)
    blocks: dict[str, LayerInfo] = {}
    absorbed: set[str] = set()
    for name in chosen:
        if name in absorbed:
            continue
        if isinstance(candidates[name], experts.ExpertProjection):  # a slice of a fused parameter: its own user
            blocks[name] = layer_info(name, candidates[name])
            continue
        users = owners[id(candidates[name].weight)]
        foreign = [u for u in users if u not in candidates or is_conv1d(candidates[u]) != is_conv1d(candidates[name])]
        if foreign:
            raise ValueError(f"layer {name}'s weight is shared with {', '.join(repr(u) for u in foreign)} "
                             f"({type(modules[foreign[0]]).__name__}), which uses it outside a linear layer: its gradient "
                             f"has contributions that cannot be captured; exclude {name!r} from layers")
        absorbed.update(users)
        blocks[name] = layer_info(name, candidates[name], tuple(users))
    return blocks


def coverage(model: nn.Module, blocks: dict[str, LayerInfo]) -> dict:
    """{"attributed": the weight entries the blocks cover, "total": the model's parameters (each shared one once),
    "fraction"}: how much of the model the attribution sees (biases, norms, embeddings and routers are not
    layer weights; a fused experts module counts each expert's projections)."""
    total = sum(p.numel() for p in model.parameters())
    attributed = sum(i.params for i in blocks.values())
    return {"attributed": attributed, "total": total, "fraction": attributed / total if total else 0.0}
