"""Regional compilation: ``torch.compile`` the model's repeated blocks (a transformer's decoder layers) once,
and run the rest of the cache step eagerly around them.

A whole-step compile traces the model, the loss and the gradient as one graph: minutes on a CPU for SmolLM2
(BENCHMARKS.md, "Compile or not"). Here one code object is compiled and every block runs through it, so the
compile is one block's: the blocks share a class and their Python code, and the capture's hooks on their target
layers read each layer's compressor and sketch z from the module itself (attribution.capture), so nothing
per-layer is a constant that Dynamo would guard on. Batches of any size and length share the graph (dynamic
shapes), and each instance compiles its own copy of the code (its own recompile budget, as
:class:`attribution.compiled.CompiledStep`).

The step around the blocks stays eager, so the gradient is ``torch.autograd.grad`` w.r.t. the sketches (a
compiled block inside ``torch.func.grad`` is refused by torch 2.13). The first block's input does not depend on a
sketch; it is made a leaf that requires a gradient, so that every block sees the same ``requires_grad`` and one
graph serves them all (its input gradient is the one extra cost: one block's).

Only the in-backward path uses it: without other-parameter blocks (``params=``, taken with torch.func), without
the factors' path, and not for sharded or mixture-of-experts models (:class:`attribution.compression.BatchCompressor`
decides).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections import Counter
from typing import Callable

import torch
from torch import nn

from grass_ops import _compat

from .batches import batch_tensors
from .compiled import own_code_copy, variable_dims
from .layers import LayerInfo

MIN_BLOCKS = 2  # fewer repeated blocks than this: nothing to share, the whole step is compiled instead


def repeated_blocks(model: nn.Module, layers: dict[str, LayerInfo]) -> list[nn.Module]:
    """The children of one ``nn.ModuleList`` that share the list's most common class and hold target layers
    (a transformer's decoder layers); of several such lists, the one holding the most target-layer modules.
    Empty when no list has ``MIN_BLOCKS`` of them."""
    targets = {m for info in layers.values() for m in info.modules}
    best: tuple[int, list[nn.Module]] = (0, [])
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < MIN_BLOCKS:
            continue
        common = Counter(type(child) for child in module).most_common(1)[0][0]
        blocks, held = [], 0
        for i, child in enumerate(module):
            inside = sum(1 for t in targets if t.startswith(f"{prefix}.{i}." if prefix else f"{i}."))
            if type(child) is common and inside:
                blocks.append(child)
                held += inside
        if len(blocks) >= MIN_BLOCKS and held > best[0]:
            best = (held, blocks)
    return best[1]


def _call_block(block: nn.Module, *args, **kwargs):
    return block._call_impl(*args, **kwargs)


class RegionalCompile:
    """The blocks of ``model`` run through one compiled copy of their call while :meth:`active` (each block's
    ``_compiled_call_impl``, the hook ``nn.Module.compile`` uses, set for the duration and restored after). A
    Hugging Face model's key-value cache is off meanwhile (``config.use_cache``): a loss needs none, and each
    block would index its own layer of it (a per-block constant)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], name: str = "step"):
        if len(blocks) < MIN_BLOCKS:
            raise ValueError(f"regional compilation needs at least {MIN_BLOCKS} repeated blocks, got {len(blocks)}")
        self.model, self.blocks, self.name = model, list(blocks), name
        # fullgraph: a block that cannot be one graph runs eagerly (with a warning), so "compiled" means compiled
        self.compiled: Callable | None = torch.compile(own_code_copy(_call_block), dynamic=True, fullgraph=True)
        self.stats = {"compiled": False, "graph_breaks": None, "compile_seconds": 0.0, "graphs": 0, "fallback": None,
                      "blocks": len(self.blocks)}

    def _call(self, block: nn.Module, *args, **kwargs):
        if self.compiled is None:  # a compile failed: eager from then on
            return block._call_impl(*args, **kwargs)
        if torch.is_grad_enabled():
            args, kwargs = _input_needing_grad(args, kwargs)
        for t in batch_tensors((args, kwargs)):  # batch and sequence dims symbolic: one graph for every batch
            for dim in variable_dims(t):
                _compat.maybe_mark_dynamic(t, dim)
        try:
            with _compat.regional_compile_config():
                out = self.compiled(block, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a compiler failure: eager decides whether it is the caller's
            out = block._call_impl(*args, **kwargs)  # raises the caller's own errors eagerly
            self.compiled = None
            self.stats["fallback"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"{self.name}: torch.compile of the repeated blocks failed ({self.stats['fallback']}); running "
                          "them eagerly from now on", stacklevel=3)
            return out
        self.stats["compiled"] = True
        return out

    @contextlib.contextmanager
    def active(self):
        """The blocks compiled for the duration of the block (re-entrant)."""
        before = [block._compiled_call_impl for block in self.blocks]
        if all(isinstance(b, functools.partial) and b.func == self._call for b in before):  # already active
            yield
            return
        seconds, graphs = _compat.compile_seconds(), _compat.compiled_graphs()
        config = getattr(self.model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        for block in self.blocks:
            block._compiled_call_impl = functools.partial(self._call, block)
        try:
            if use_cache:
                config.use_cache = False
            yield
        finally:
            if use_cache:
                config.use_cache = use_cache
            for block, call in zip(self.blocks, before):
                block._compiled_call_impl = call
            self.stats["compile_seconds"] += _compat.compile_seconds() - seconds
            self.stats["graphs"] += _compat.compiled_graphs() - graphs
            if self.stats["compiled"] and self.stats["graph_breaks"] is None:
                self.stats["graph_breaks"] = 0

    def wrap(self, step: Callable) -> Callable:
        """``step`` run with the blocks compiled."""
        @functools.wraps(step)
        def run(*args, **kwargs):
            with self.active():
                return step(*args, **kwargs)

        return run


def _input_needing_grad(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's hidden state (its first positional tensor, else ``hidden_states=``) as a leaf requiring a
    gradient when it does not: the first block's input then looks like every other block's to the compiler."""
    if args and isinstance(args[0], torch.Tensor):
        if args[0].is_floating_point() and not args[0].requires_grad:
            args = (args[0].detach().requires_grad_(), *args[1:])
    elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
        hidden = kwargs["hidden_states"]
        if hidden.is_floating_point() and not hidden.requires_grad:
            kwargs = {**kwargs, "hidden_states": hidden.detach().requires_grad_()}
    return args, kwargs
