"""Gradient-based training-data attribution with grass_ops compressors.

    from attribution import Attributor
    attr = Attributor(model, loss_fn, method="if", compressor="factgrass", k=4096, damping=1e-3)
    attr.cache(train_loader)
    scores = attr.attribute(test_loader)          # [n_test, n_train]
    values, indices = attr.top_k(test_loader, k=10)

The same configuration as an object: ``Attributor(model, loss_fn, config=AttributorConfig(method="if", k=4096))``.
"""
from . import _moved
from .attributor import METHODS, Attributor, QueryFeatures
from .batches import batch_digest
from .compression import build_compressors, parse_spec
from .config import AttributorConfig
from .layers import LayerInfo, find_layers
from .store import CorruptStoreError, IncompleteStoreError, StoreBusyError, StoreError
from .store.manifest import model_fingerprint

__all__ = ["Attributor", "AttributorConfig", "METHODS", "CorruptStoreError", "IncompleteStoreError", "LayerInfo",
           "QueryFeatures", "StoreBusyError", "StoreError", "batch_digest", "build_compressors", "find_layers", "model_fingerprint",
           "parse_spec"]

_moved.install()  # the old module names (attribution.compress, attribution.facts, ...) still import
