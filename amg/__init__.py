"""AMG-Bench: Attention Map Guided pruning of ViT person Re-ID models, and its benchmark suite."""

__version__ = "0.1.0"
