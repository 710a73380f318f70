"""torch.distributed helpers: every stage calls these, so a single process is the world of one.

Ranks share one store directory. The cache stage gives rank r the batches i % world == r; ranks
meet at barriers where one rank must finish before the others read (cleanup, completion).
"""
from __future__ import annotations

import os
import sys

import torch


def exit_now(status: int) -> None:
    """End the process with ``status`` after its process group was destroyed, without the interpreter's
    shutdown (stdout and stderr flushed; atexit handlers skipped). With gloo, torch 2.13 aborts a process in
    that shutdown now and then, after everything finished ("terminate called without an active exception",
    SIGABRT: about 1 two-rank run in 10 on the 2-core test machine), which a launcher reports as a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * rank_and_world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


class RankFailed(RuntimeError):
    """Another rank's error, raised on this rank. ``kinds``: the qualified names of that error's classes
    (its MRO), so that a caller can handle it as it would the error itself."""

    def __init__(self, rank: int, kinds: tuple[str, ...], message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.kinds = rank, tuple(kinds)

    @staticmethod
    def describe(error: BaseException) -> tuple[tuple[str, ...], str]:
        """(kinds, message) of an error, as another rank receives it."""
        return tuple(f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__), f"{type(error).__name__}: {error}"

    def is_a(self, *classes: type) -> bool:
        """Whether the other rank's error was an instance of one of ``classes``."""
        return any(f"{c.__module__}.{c.__qualname__}" in self.kinds for c in classes)


def first_error(error: BaseException | None) -> BaseException | None:
    """Collective: the first rank's error (by rank), so that every rank raises together instead of
    leaving the others waiting at the next barrier. ``error`` is this rank's (None if it succeeded);
    a rank that succeeded gets the first failing rank's error as :class:`RankFailed`."""
    if not is_distributed():
        return error
    reports = all_gather_objects(None if error is None else RankFailed.describe(error))
    if error is not None:
        return error
    for rank, report in enumerate(reports):
        if report is not None:
            return RankFailed(rank, *report)
    return None


def init_from_environment() -> bool:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...): gloo on CPU, nccl with one CUDA device per LOCAL_RANK. Returns whether a
    process group is (now) initialized; does nothing outside torchrun."""
    dist = torch.distributed
    if not dist.is_available() or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return dist.is_available() and dist.is_initialized()
    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def local_device() -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
