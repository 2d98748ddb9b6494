"""mintjax: a million personal LoRA models on one foundation model, in JAX."""

__version__ = "0.1.0"
