"""Making the attention record of a model: its head entropies on the calibration images."""

from __future__ import annotations

from typing import Mapping

import torch

from amg.benchmark.attention_record import AttentionRecord
from amg.model.plan import PrunePlan
from amg.model.vit import ReIDViT
from amg.pruning.scores import calibrate, head_entropy


def make_record(model: ReIDViT, checkpoint: str, calibration_images: torch.Tensor,
                plans: Mapping[str, PrunePlan]) -> AttentionRecord:
    """Entropies of `model` (unpruned) on `calibration_images` (uint8), with `plans` made for it."""
    result = calibrate(model, calibration_images, gradients=False)
    entropy = [head_entropy(attention).tolist() for attention in result.mean_attention]
    config = model.config
    return AttentionRecord(config.name, checkpoint, tuple(config.img_size), tuple(config.grid_size),
                           config.patch_stride or config.patch_size, entropy,
                           {name: plan.to_dict() for name, plan in plans.items()})
