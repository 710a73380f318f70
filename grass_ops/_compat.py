"""Every private torch API the product code uses, in one place, each with why no public one serves.

When a torch release moves one of these, this module is the only one to change. ``torch._dynamo`` is
reached through functions, so importing grass_ops does not import the compiler.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as _pytree

# Sees every aten op with its real outputs (grass_ops.benchmarking.PeakMemory): no public dispatch mode.
from torch.utils._python_dispatch import TorchDispatchMode

# Argument checks that also run under FakeTensor / torch.compile tracing (a plain ``raise`` on a
# symbolic size would specialize or break the graph); torch documents them but names them privately.
check_type = torch._check_type
check_value = torch._check_value

# Nested containers (a batch may be a tensor, a tuple, a dict of tensors): torch has no public pytree.
tree_map = _pytree.tree_map
tree_leaves = _pytree.tree_leaves
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten


def auto_dispatch_below_autograd():
    """A guard that sends an op straight to its backend kernels: a custom op's Autograd kernel needs it
    when no input requires grad (torch.library's own custom_op uses the same guard; no public one)."""
    return torch._C._AutoDispatchBelowAutograd()


def maybe_mark_dynamic(t: torch.Tensor, dim: int) -> None:
    """Hint Dynamo that ``dim`` of ``t`` varies (no recompile for a new batch size or sequence length)
    without failing when the graph specializes it; torch.compile's API has no public form of it."""
    torch._dynamo.maybe_mark_dynamic(t, dim)


def regional_compile_config():
    """A context in which Dynamo (1) gives tensors held as attributes of nn.Modules symbolic shapes, as it gives
    inputs (by default it makes them static, like buffers): attribution.regional reads each layer's sketch z [B, k]
    from its module, and a static B would recompile the block for every batch size; (2) raises when a function hits
    its recompile limit, instead of running it eagerly with only a log line, so the caller can say so. No public
    switch for either."""
    config = torch._dynamo.config
    wanted = {"force_nn_module_property_static_shapes": False, "fail_on_recompile_limit_hit": True}
    return config.patch(**{key: value for key, value in wanted.items() if hasattr(config, key)})


def compile_seconds() -> float:
    """Seconds Dynamo has spent compiling in this process (for stats; no public counter)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return float(sum(metrics.get("_compile.compile_inner", [])))


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (for stats; no public counter)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def unsupported_by_compiler() -> tuple[type[BaseException], ...]:
    """The errors of ``torch.compile(fullgraph=True)`` that mean "graph break", not a bug of the step
    (retried with graph breaks; torch exports no public exception types for them)."""
    return (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)


def explain_graph_breaks(fn, *args) -> int:
    """The number of graph breaks of ``fn(*args)`` (torch._dynamo.explain; no public API counts them)."""
    return torch._dynamo.explain(fn)(*args).graph_break_count


__all__ = ["TorchDispatchMode", "auto_dispatch_below_autograd", "check_type", "check_value", "compile_seconds",
           "compiled_graphs", "explain_graph_breaks", "maybe_mark_dynamic", "tree_leaves", "tree_map",
           "unsupported_by_compiler"]
