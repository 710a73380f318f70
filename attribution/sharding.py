"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): what the stages do differently.

A sharded model's parameters are DTensors holding 1/world of each tensor; every forward all-gathers a block's
parameters from every rank, so every forward and backward is a collective: all ranks must run the same number
of them, in the same order. The per-sample gradients need no parameter gradient (:mod:`attribution.capture`),
so the backward all-gathers the weights it multiplies by and reduce-scatters nothing; the gradients, and every
score, equal the unsharded model's.

* The cache stage runs in rounds: in each one every rank compresses one batch, its own (rank r: batches
  r, r + world, ...) or, when it has none left or its batch is already stored, one sample of a batch, whose
  result is dropped (:func:`attribution.cache.write_shards`).
* The output-shape pass of :class:`attribution.compression.BatchCompressor` runs for every batch (a cached
  shape would skip a collective forward on one rank only), and the step runs eagerly (no torch.compile).
* The weights' fingerprint gathers each parameter whole, one at a time (:mod:`attribution.store.manifest`),
  so a sharded and an unsharded run of one model share a store.
* Refused: a model only partly sharded (some parameters DTensors, others not), TracIn/TRAK checkpoints (each
  would be a sharded state to swap in), the true Fisher and K-FAC (rank 0 alone re-reads the data through
  the model) and params= blocks (torch.func over DTensors).

Memory per rank: the parameters / world, plus one block's gathered parameters at a time (two with FSDP2's
prefetch), plus the batch's activations; the compressed gradients and the FIM do not depend on the sharding. Loading
is not sharded: each rank loads the whole model into host memory (``grass-attribute --fsdp`` loads it on the CPU
and lets fully_shard move each rank's shards to its GPU), so host memory must hold world copies at load time.
"""
from __future__ import annotations

import fnmatch

from torch import nn

BLOCK_LISTS = ("*layers", "*.h")  # the ModuleLists of transformer blocks (Llama's model.layers, GPT-2's transformer.h)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's sharded parameters)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def check_sharding(model: nn.Module) -> bool:
    """Whether the model is sharded; a ValueError for one only partly sharded (some parameters not DTensors) and
    for FSDP1 (FullyShardedDataParallel's flat parameters, whose forwards are collectives too)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        FullyShardedDataParallel = ()
    wrapped = [n or "(root)" for n, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    if wrapped:
        raise ValueError(f"the model is wrapped with FSDP1 (FullyShardedDataParallel: {wrapped[0]}): shard it with FSDP2 "
                         "instead (torch.distributed.fsdp.fully_shard; attribution.sharding.shard)")
    names = [(n, _is_dtensor(p)) for n, p in model.named_parameters()]
    sharded = [n for n, s in names if s]
    if sharded and len(sharded) != len(names):
        plain = [n for n, s in names if not s]
        raise ValueError(f"the model is only partly sharded: {len(plain)} of its {len(names)} parameters (e.g. "
                         f"{plain[:3]}) are not DTensors; apply fully_shard to the root module too "
                         "(fully_shard(block) for each block, then fully_shard(model))")
    return bool(sharded)


def check_supported(config) -> None:
    """The configuration options a sharded model cannot serve, refused with the reason."""
    problems = []
    if config.checkpoints is not None and any(state is not None for state in config.checkpoints):
        problems.append("checkpoints (each would be a sharded state to swap in)")
    if config.fisher != "empirical":
        problems.append(f"fisher={config.fisher!r} (rank 0 alone re-reads the data through the model)")
    if config.preconditioner in ("kfac", "ekfac", "kfac-whitened", "ekfac-whitened"):
        problems.append(f"preconditioner={config.preconditioner!r} (rank 0 alone re-reads the data through the model)")
    if config.params:
        problems.append("params= blocks (per-sample gradients of DTensor parameters)")
    if problems:
        raise ValueError("a sharded (FSDP2) model does not support " + "; ".join(problems))


def shard(model: nn.Module, device: str | None = None) -> nn.Module:
    """``model`` sharded across the ranks of the default process group with FSDP2: fully_shard on every block of
    its transformer block lists (BLOCK_LISTS), then on the root. ``device`` ("cuda", "cuda:1", "cpu"; None: where
    the parameters are): the mesh's device type; fully_shard moves each rank's shards there, so a model loaded on
    the CPU reaches each GPU sharded (each rank still holds the whole model in host memory until it is sharded)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("sharding needs torch.distributed (run under torchrun)")
    kind = torch.device(device).type if device is not None else next(model.parameters()).device.type
    mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    blocks = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and any(fnmatch.fnmatchcase(n, p) for p in BLOCK_LISTS)]
    if not blocks:
        raise ValueError(f"the model has no ModuleList of transformer blocks named {BLOCK_LISTS} to shard")
    for block_list in blocks:
        for block in block_list:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
