"""The interface every preconditioner implements (see attribution.preconditioners)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from torch import Tensor

from ..gradients import ModelGradients
from ..scoring import QueryFeatures
from ..store import Completion, Store
from ..streaming import RowBudget

if TYPE_CHECKING:  # an annotation only: config imports this package
    from ..config import AttributorConfig


@dataclass
class Setup:
    """What a preconditioner is built from: the Attributor's ``config`` (method, fisher, seed, progress,
    the current damping), its ``store``, its ``gradients`` (blocks, offsets, widths, compressors, device,
    dtype, stats), its row ``budget`` and ``signature`` (that of the query features it computes)."""

    config: AttributorConfig
    store: Store
    gradients: ModelGradients
    budget: RowBudget
    signature: str


class Preconditioner:
    """The query side of "if" / "trak": score(z_test, z_i) = <P^-1 g_test, g_i> with P derived from the
    cached training data.

    Collective parts (under torch.distributed every rank calls them together): :meth:`derive`. The
    others are local and give every rank the same result."""

    name = ""  # its preconditioner= value (the registry key)
    needs_factors = False  # its statistics come from the target layers' training factors (empirical Fisher)
    full_query_gradients = False  # it preconditions a query's full gradient (no precomputed compressed queries)
    derived_names: tuple[str, ...] = ()  # its derived data, per checkpoint of the store
    whitened = False  # the store holds whitened rows (its curvature comes before the cache: :meth:`prepare`)

    def __init__(self, setup: Setup):
        self.setup, self.store, self.config, self.gradients = setup, setup.store, setup.config, setup.gradients
        self.device, self.dtype = setup.gradients.device, setup.gradients.dtype

    # ---- cache stage ---------------------------------------------------------------------------
    def observer(self, ckpt: int, writer):
        """The cache stage's observer of the shards this rank writes (see attribution.cache.write_shards), or None."""
        return None

    def prepare(self, ckpt: int, train_loader: Iterable, writer, curvature_loader: Iterable | None) -> None:
        """Collective, before checkpoint ``ckpt``'s cache: what the cache step needs first (a whitening's pass one)."""
        if curvature_loader is not None:
            raise ValueError(f"curvature_loader is for preconditioner 'kfac-whitened' / 'ekfac-whitened' (their pass one); "
                             f"preconditioner={self.name!r} takes its curvature from the cached training gradients")

    def fingerprint(self, record: Completion) -> str:
        """The fingerprint its derived data carries: that of the shards it was derived from."""
        return record.fingerprint

    def is_derived(self, ckpt: int, record: Completion) -> bool:
        """Whether the store holds all of its derived data for ``record`` (this rank's view)."""
        return all(self.store.has_derived(ckpt, name, self.fingerprint(record)) for name in self.derived_names)

    def meta(self) -> dict:
        """Recorded with the derived data."""
        return {"preconditioner": self.name, "damping": self.config.damping}

    def derive(self, ckpt: int, record: Completion, loader: Iterable, writer) -> None:
        """Collective. Everything it needs computed from checkpoint ``ckpt``'s cached data (``record``), if
        not already in the store, saved there (rank 0 writes, after ``writer.ensure()``)."""

    # ---- queries -------------------------------------------------------------------------------
    def query_features(self, test_loader: Iterable, records: list[Completion], damping=None) -> QueryFeatures:
        """The queries' features (reusable across dampings). ``damping``: the one the caller will score
        with, so a preconditioner may prepare the queries for it while streaming the loader."""
        return QueryFeatures(self.gradients.query_gradients(test_loader), self.setup.signature)

    def features_of(self, grads: list[Tensor]) -> QueryFeatures:
        """Query features of precomputed compressed query gradients (one [n_test, columns] tensor per checkpoint)."""
        return QueryFeatures(grads, self.setup.signature)

    def precondition(self, ckpt: int, record: Completion, features: QueryFeatures, damping) -> Tensor:
        """[n_test, columns]: checkpoint ``ckpt``'s queries preconditioned for ``damping``, on the device."""
        raise NotImplementedError

    def quadratic_form(self, ckpt: int, record: Completion, damping) -> Callable[[Tensor], Tensor]:
        """g [r, columns] -> [r] float64 g^T P^-1 g (self-influence from the compressed training rows)."""
        raise NotImplementedError
