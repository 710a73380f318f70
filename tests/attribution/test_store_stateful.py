"""A Hypothesis state machine over one disk store: random sequences of cache, interrupted cache,
resume, growth, corruption, deleted shards and fresh Attributors. Every read ends either in a
clear store error or in scores equal to a fresh in-memory cache of the data the store holds."""
import shutil
import tempfile
from pathlib import Path

import torch
from attribution_problems import Interrupt, interrupting, loss_fn, make_problem
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from attribution import Attributor, CorruptStoreError, IncompleteStoreError, StoreError

MODEL, POOL, TEST = make_problem(torch.float64, n_train=48, batch=8)  # 6 batches of 8
KWARGS = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False, damping=1e-2)
_REFERENCE: dict[int, torch.Tensor] = {}


def reference(n_batches: int) -> torch.Tensor:
    """Scores of a fresh in-memory cache of the first n batches."""
    if n_batches not in _REFERENCE:
        _REFERENCE[n_batches] = Attributor(MODEL, loss_fn, **KWARGS).cache(POOL[:n_batches]).attribute(TEST)
    return _REFERENCE[n_batches]


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def make_store(self):
        self.root = Path(tempfile.mkdtemp(prefix="grass_store_sm_")) / "store"
        self.cached = 0  # batches of the last cache() that completed
        self.damaged: set[int] = set()  # shards whose bytes we altered

    def teardown(self):
        shutil.rmtree(self.root.parent, ignore_errors=True)

    def _visible(self) -> list[int]:
        shards = self.root / "ckpt_000" / "shards"
        return [int(e.name) for e in shards.iterdir() if e.name.isdigit()] if shards.exists() else []

    def _attributor(self):
        return Attributor(MODEL, loss_fn, store=self.root, **KWARGS)

    @rule(n=st.integers(1, 6))
    def cache(self, n):
        try:
            self._attributor().cache(POOL[:n])
        except ValueError as err:  # a store only grows
            assert "beyond the train loader" in str(err) and max(self._visible(), default=-1) >= n, str(err)
            return
        except CorruptStoreError as err:  # growth re-reads damaged shards to form the FIM
            assert self.damaged and ("checksum" in str(err) or "truncated" in str(err)), str(err)
            return
        self.cached = n

    @rule(n=st.integers(2, 6), after=st.integers(0, 5))
    def interrupted_cache(self, n, after):
        try:
            self._attributor().cache(interrupting(POOL[:n], after=min(after, n - 1)))
        except (Interrupt, ValueError):
            pass

    @precondition(lambda self: self.cached > 0)
    @rule(data=st.data())
    def corrupt_a_shard(self, data):
        index = data.draw(st.integers(0, self.cached - 1))
        path = self.root / "ckpt_000" / "shards" / f"{index:08d}" / "grads.npy"
        if path.exists():
            raw = bytearray(path.read_bytes())
            raw[-3] ^= 0x10
            path.write_bytes(bytes(raw))
            self.damaged.add(index)

    @precondition(lambda self: self.cached > 0)
    @rule(data=st.data())
    def delete_a_shard(self, data):
        index = data.draw(st.integers(0, self.cached - 1))
        shutil.rmtree(self.root / "ckpt_000" / "shards" / f"{index:08d}", ignore_errors=True)
        self.damaged.discard(index)

    @rule()
    def fresh_attributor_reads(self):
        try:
            attr = self._attributor()
            scores = attr.attribute(TEST)
        except (IncompleteStoreError, CorruptStoreError) as err:
            assert "cache(" in str(err) or "checksum" in str(err) or "truncated" in str(err), str(err)
            return
        except StoreError as err:
            raise AssertionError(f"unexpected store error: {err}") from None
        assert not self.damaged, "a damaged shard was read without an error"
        n = attr.n_train // 8
        torch.testing.assert_close(scores, reference(n), rtol=1e-9, atol=1e-9)

    @invariant()
    def no_partial_shard_is_visible(self):
        shards = self.root / "ckpt_000" / "shards"
        if shards.exists():
            for entry in shards.iterdir():
                if entry.name.isdigit():
                    assert (entry / "grads.npy").exists() and (entry / "meta.json").exists()


StoreMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=12, deadline=None)
test_store_state_machine = StoreMachine.TestCase
