"""The training recipe's settings (torch-free: the command line shows its defaults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from amg.errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    num_identities: int = 16  # P in a PK batch
    num_instances: int = 4  # K in a PK batch
    lr: float = 1e-3
    min_lr_fraction: float = 0.01
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    erase_p: float = 0.0  # see README: with 800 CPU steps erasing leaves the small model underfit
    seed: int = 0
    log_every: int = 50
    # Soft distillation from a teacher (the unpruned model) when fine-tuning a pruned one:
    # loss = (1 - alpha) * (ID + triplet) + alpha * tau^2 * KL, the reference's alpha 0.2, tau 1.
    distill_alpha: float = 0.2
    distill_tau: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError("steps must be >= 1")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise InputError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)
