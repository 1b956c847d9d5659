"""The measure layer: MACs (fvcore), latency (paired speed-ups), isolated peak memory, the
backends a model runs on and the device it runs on. Knows models, not how they were pruned."""
