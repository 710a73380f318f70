"""Integrations with training frameworks: :class:`GradientCacheCallback` for the Hugging Face Trainer."""
from .trainer import GradientCacheCallback, causal_lm_loss, example_digest, recorded_rows

__all__ = ["GradientCacheCallback", "causal_lm_loss", "example_digest", "recorded_rows"]
