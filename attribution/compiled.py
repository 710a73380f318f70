"""A per-batch step under ``torch.compile(fullgraph=True)`` that ordinary use cannot crash.

* Every :class:`CompiledStep` compiles its own copy of the step's code object, so each instance has
  its own recompile budget: any number of Attributors can share a process (Dynamo caches compiled
  code per code object, and 8 recompiles of one code object are the limit).
* The sample dimension of every batch tensor (and of the probes) is marked dynamic, and so are the
  other dims that vary between batches (sequence lengths: every dim of an integer tensor, every dim
  but the last of a floating one), so batches of any size and length share one graph: a short last
  batch or a new length does not recompile (an LLM step takes minutes to compile: BENCHMARKS.md), and
  nothing is padded (a loss that depends on the batch size stays exactly the eager one).
* A model that cannot be captured whole compiles with graph breaks (their count is in ``stats``);
  any other failure of the compiled step falls back to eager with one warning, never an exception
  (an error that eager raises too is the caller's, and propagates).
"""
from __future__ import annotations

import itertools
import types
import warnings
from typing import Callable

import torch

from grass_ops import _compat

from .batches import batch_tensors

_copies = itertools.count()


def own_code_copy(fn: Callable) -> Callable:
    """``fn`` with a fresh code object (same behaviour), so torch.compile caches it separately."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def variable_dims(t: torch.Tensor) -> range:
    """The dims of a batch tensor that may differ between batches, marked dynamic up front so that
    they do not recompile: every dim of an integer tensor (token ids and masks [B, T]), every dim but
    the last (features) of a floating one (probes [B, T, d], inputs [B, d]). A hint: a dim the model
    fixes (e.g. a feature dim that meets a weight) is specialized as before."""
    if t.dim() == 0:
        return range(0)
    return range(t.dim() if not (t.is_floating_point() or t.is_complex()) else max(1, t.dim() - 1))


class CompiledStep:
    """step(batch) -> tuple of tensors whose dim 0 is the batch's samples.

    fn(batch, *prepare(batch)) is the eager step; ``prepare`` builds its other inputs (e.g. probes)
    outside the compiled region. compile=False runs it eagerly."""

    def __init__(self, fn: Callable, prepare: Callable, compile: bool = True, name: str = "step"):
        self.fn, self.prepare, self.name = fn, prepare, name
        self.mode = "compiled" if compile else "eager"
        self.compiled = torch.compile(own_code_copy(fn), fullgraph=True) if compile else None
        self.stats = {"compiled": False, "graph_breaks": None, "compile_seconds": 0.0, "graphs": 0, "fallback": None}

    def __call__(self, batch):
        if self.mode == "eager":
            return self.fn(batch, *self.prepare(batch))
        return self._run(batch)

    def _run(self, batch):
        args = self.prepare(batch)
        for t in batch_tensors((batch, args)):
            for dim in variable_dims(t):
                _compat.maybe_mark_dynamic(t, dim)
        before, graphs = _compat.compile_seconds(), _compat.compiled_graphs()
        try:
            out = self.compiled(batch, *args)
        except _compat.unsupported_by_compiler() as err:
            if self.mode == "graph_breaks":
                return self._fall_back(batch, args, err)
            out = self._compile_with_graph_breaks(batch, args, err)
        except Exception as err:  # noqa: BLE001 - any compiler failure: eager decides whether it is the caller's
            return self._fall_back(batch, args, err)
        finally:
            self.stats["compile_seconds"] += _compat.compile_seconds() - before
            self.stats["graphs"] += _compat.compiled_graphs() - graphs
        self.stats["compiled"] = True
        if self.stats["graph_breaks"] is None:
            self.stats["graph_breaks"] = 0
        return out

    def _compile_with_graph_breaks(self, batch, args, err):
        self.stats["graph_breaks"] = breaks = _compat.explain_graph_breaks(self.fn, batch, *args)
        warnings.warn(f"{self.name}: the model cannot be compiled as one graph ({breaks} graph "
                      f"breaks; first: {str(err).splitlines()[0]}); compiling with graph breaks", stacklevel=4)
        self.mode = "graph_breaks"
        self.compiled = torch.compile(own_code_copy(self.fn))
        try:
            return self.compiled(batch, *args)
        except Exception as error:  # noqa: BLE001
            return self._fall_back(batch, args, error)

    def _fall_back(self, batch, args, err):
        out = self.fn(batch, *args)  # raises the caller's own errors eagerly
        self.mode, self.compiled = "eager", None
        self.stats["fallback"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"{self.name}: torch.compile failed ({self.stats['fallback']}); running eagerly from now on",
                      stacklevel=4)
        return out
