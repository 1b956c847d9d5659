"""The loss that calibration back-propagates to score heads and tokens, and the mode it runs in.

Three losses, by name:
- "id" (default): cross-entropy of the model's own classifier, eval mode, no augmentation;
- "distill": squared distance of the class-token features to a teacher's (label-free);
- "reference": as the AMG reference calibrates, during a training epoch: train mode
  (dropout, drop-path and BatchNorm batch statistics active), random horizontal flips, and
  cross-entropy + 0.2 x KL(teacher || model) with the unpruned model as the teacher. The
  reference sums the cross-entropy over its part classifiers; a ReIDViT has one classifier.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F

from amg.errors import InputError
from amg.train.losses import soft_distillation
from amg.train.reid_training import teacher_classify

CALIBRATION_LOSSES = ("id", "distill", "reference")
REFERENCE_KL_WEIGHT = 0.2
FLIP_PROBABILITY = 0.5


def check_loss(loss: str, teacher) -> None:
    if loss not in CALIBRATION_LOSSES:
        raise InputError(f"unknown calibration loss {loss!r}; choose one of {', '.join(CALIBRATION_LOSSES)}")
    if loss == "distill" and teacher is None:
        raise InputError("loss='distill' needs a teacher model (e.g. the unpruned model)")


def default_teacher(loss: str, teacher, model):
    """The reference distils from the unpruned model: without one given, the model as it is now."""
    if loss == "reference" and teacher is None:
        return copy.deepcopy(model).eval()
    return teacher


def teacher_target(loss: str, teacher, images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor | None:
    """What the loss compares the model with: the teacher's features (distill) or logits (reference)."""
    if loss == "id":
        return None
    with torch.no_grad():
        teacher.eval()
        if loss == "distill":
            return teacher.forward_tokens(images, camids)[:, 0]
        return teacher_classify(teacher, images, camids)


def calibration_loss(model, images: torch.Tensor, labels: torch.Tensor | None, camids: torch.Tensor | None,
                     loss: str, target: torch.Tensor | None) -> torch.Tensor:
    features = model.forward_tokens(images, camids)[:, 0]
    if loss == "distill":
        return (features - target).pow(2).sum(dim=1).mean()
    if model.classifier is None or labels is None:
        raise InputError(f"calibration with the {loss!r} loss needs labels and a model with a classifier; "
                         "use loss='distill' with a teacher model otherwise")
    logits = model.classifier(model.neck(features))
    cross_entropy = F.cross_entropy(logits, labels)
    if loss == "reference":
        return cross_entropy + REFERENCE_KL_WEIGHT * soft_distillation(logits, target)
    return cross_entropy


@contextlib.contextmanager
def calibration_mode(model, loss: str, seed: int) -> Iterator[torch.Generator | None]:
    """Eval mode; for "reference" train mode with seeded randomness, yielding the flips' generator.

    Train mode updates BatchNorm's running statistics: they are put back afterwards, so
    calibrating never changes the model it scores.
    """
    if loss != "reference":
        model.eval()
        yield None
        return
    saved = {name: buffer.clone() for name, buffer in model.named_buffers() if buffer is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and drop-path: the same plan for the same seed
        model.train()
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            model.eval()
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in saved:
                        buffer.copy_(saved[name])


def augment(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flips (the reference's training transform); unchanged without a generator."""
    if generator is None:
        return images
    flip = torch.rand(len(images), generator=generator) < FLIP_PROBABILITY
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
