"""Measurements that know nothing about pruning: FLOPs (fvcore), and later latency and memory."""
