"""Gradient-based training-data attribution with grass_ops compressors.

    from attribution import Attributor
    attr = Attributor(model, loss_fn, method="if", compressor="factgrass", k=4096, damping=1e-3)
    attr.cache(train_loader)
    scores = attr.attribute(test_loader)          # [n_test, n_train]
    values, indices = attr.top_k(test_loader, k=10)
"""
from .attributor import METHODS, Attributor, batch_digest, model_fingerprint
from .compress import build_compressors, parse_spec
from .layers import LayerInfo, find_layers

__all__ = ["Attributor", "METHODS", "LayerInfo", "batch_digest", "build_compressors", "find_layers",
           "model_fingerprint", "parse_spec"]
