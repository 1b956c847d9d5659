"""The pruning layer: the policy registry, calibration, scores, selection, making plans, plans by
MACs target, schedules (one-shot, fine-tuned, iterative). Builds on model, train and measure."""
