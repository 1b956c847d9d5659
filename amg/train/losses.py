"""Re-ID training losses: ID cross-entropy with label smoothing, batch-hard triplet, distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amg.errors import InputError


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Hermans et al. 2017: per anchor, hardest positive vs hardest negative (Euclidean)."""
    if not torch.isfinite(features).all():  # else every distance is NaN and no pair looks valid
        raise InputError("the features are not finite numbers (NaN or inf): training diverged; "
                         "lower the learning rate")
    distances = torch.cdist(features, features).clamp_min(1e-12)
    same = labels.view(-1, 1) == labels.view(1, -1)
    hardest_positive = distances.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(same, float("inf")).amin(dim=1)
    valid = torch.isfinite(hardest_negative) & torch.isfinite(hardest_positive)
    if not valid.any():
        raise InputError("batch-hard triplet needs at least two identities in the batch")
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def id_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hinton's soft-target loss: tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))."""
    if tau <= 0:
        raise InputError(f"distillation temperature must be > 0, got {tau}")
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="batchmean", log_target=True) * tau * tau
