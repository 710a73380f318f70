"""Preconditioners: the query side of "if" / "trak", score(z_test, z_i) = <P^-1 g_test, g_i>.

Each one (:class:`Preconditioner`, in base.py) derives its data from the cached store after caching
(``derive``, collective under torch.distributed, stored as derived data tagged with the fingerprint of
the shards it came from, so a grown store recomputes it and a new damping recomputes nothing),
preconditions the queries (``precondition``) and gives self-influence its quadratic form.

A new preconditioner: a module here with a :class:`Preconditioner` subclass, and its line in REGISTRY.
"""
from __future__ import annotations

from .base import Preconditioner, Setup
from .fim import FIMPreconditioner
from .kronecker import EKFACPreconditioner, KFACPreconditioner, KroneckerQueryFeatures, PreconditionedQueries
from .mixed import MixedPreconditioner, check_task_weight
from .none import NoPreconditioner
from .whitened import EKFACWhitened, KFACWhitened, WhitenedPreconditioner

REGISTRY: dict[str, type[Preconditioner]] = {
    "fim": FIMPreconditioner,
    "mixed": MixedPreconditioner,
    "kfac": KFACPreconditioner,
    "ekfac": EKFACPreconditioner,
    "kfac-whitened": KFACWhitened,
    "ekfac-whitened": EKFACWhitened,
    "none": NoPreconditioner,
}
PRECONDITIONERS = tuple(REGISTRY)


def resolve_preconditioner(preconditioner, method: str, preconditioned: tuple[str, ...]) -> str:
    """The preconditioner for ``method``: None -> "fim" for preconditioned methods, "none" otherwise."""
    if preconditioner is None:
        return "fim" if method in preconditioned else "none"
    if preconditioner not in REGISTRY:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    if method not in preconditioned and preconditioner != "none":
        raise ValueError(f"preconditioner={preconditioner!r} applies to methods {preconditioned}; method={method!r} "
                         "uses no preconditioner (use preconditioner='none' or leave it unset)")
    return preconditioner


def preconditioner_class(name: str) -> type[Preconditioner]:
    return REGISTRY[name]


def build_preconditioner(name: str, setup: Setup) -> Preconditioner:
    """The preconditioner ``name`` (from :func:`resolve_preconditioner`) of an Attributor."""
    return REGISTRY[name](setup)


__all__ = ["EKFACPreconditioner", "EKFACWhitened", "KFACWhitened", "WhitenedPreconditioner", "FIMPreconditioner",
           "KFACPreconditioner", "KroneckerQueryFeatures", "MixedPreconditioner", "NoPreconditioner", "PRECONDITIONERS",
           "PreconditionedQueries", "Preconditioner", "REGISTRY", "Setup", "build_preconditioner", "check_task_weight",
           "preconditioner_class", "resolve_preconditioner"]
