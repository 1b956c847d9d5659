"""The training layer: Re-ID training and losses, evaluation and metrics, the cache of trained
and fine-tuned models. Builds on the model and data layers."""
