"""Training and fine-tuning: ID loss (label smoothing) + batch-hard triplet, AdamW, warm-up + cosine."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from amg.data.sampler import PKSampler
from amg.data.transforms import BatchAugment, normalize
from amg.errors import InputError
from amg.model.vit import ReIDViT
from amg.train.config import TrainConfig
from amg.train.losses import batch_hard_triplet, id_loss, soft_distillation

Progress = Callable[[str], None]


@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per log interval
    final_accuracy: float = 0.0  # ID accuracy over the last log interval


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_fraction` of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.lr * config.min_lr_fraction
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def teacher_classify(teacher: ReIDViT, images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
    """The teacher's logits in eval mode (its BatchNorm neck uses running statistics)."""
    return teacher.classifier(teacher.neck(teacher.forward_tokens(images, camids)[:, 0]))


def _pk_batches(labels: list[int], config: TrainConfig):
    """Endless PK batches, reshuffled every epoch."""
    sampler = PKSampler(labels, config.num_identities, config.num_instances, seed=config.seed)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        for start in range(0, len(indices) - sampler.batch_size + 1, sampler.batch_size):
            yield torch.tensor(indices[start:start + sampler.batch_size])
        epoch += 1


def train_reid(model: ReIDViT, images: torch.Tensor, labels: list[int], camids: list[int],
          config: TrainConfig = TrainConfig(), progress: Progress | None = None,
          teacher: ReIDViT | None = None) -> TrainLog:
    """Train `model` in place on preloaded uint8 `images` with contiguous `labels`.

    With a `teacher` (same identities), its logits are soft targets (`distill_alpha`, `distill_tau`).
    """
    if model.classifier is None or model.num_classes < max(labels) + 1:
        raise InputError(
            f"model classifier has {model.num_classes} classes but labels go up to {max(labels)}"
        )
    if not len(images) == len(labels) == len(camids):
        raise InputError("images, labels and camids must have the same length")
    if teacher is not None:
        if teacher.classifier is None or teacher.num_classes != model.num_classes:
            raise InputError("the distillation teacher needs a classifier over the same identities as the model")
        teacher.eval()
    generator = torch.Generator().manual_seed(config.seed)
    augment = BatchAugment(model.config.img_size, erase_p=config.erase_p)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # no weight decay on norms, biases and embeddings (timm's no_weight_decay rule)
            (no_decay if parameter.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "sie_embed"))
             else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    label_tensor = torch.tensor(labels)
    camid_tensor = torch.tensor(camids)
    needs_camids = model.sie_embed is not None
    log = TrainLog()
    start = time.perf_counter()
    window_loss, window_correct, window_count = 0.0, 0, 0
    model.train()
    batches = _pk_batches(labels, config)
    for step in range(config.steps):
        index = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = augment(normalize(images[index]), generator)
        batch_labels = label_tensor[index]
        logits, features = model(batch, camid_tensor[index] if needs_camids else None)
        loss = id_loss(logits, batch_labels, config.label_smoothing) + batch_hard_triplet(
            features, batch_labels, config.triplet_margin
        )
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher_classify(teacher, batch, camid_tensor[index] if needs_camids else None)
            loss = (1 - config.distill_alpha) * loss + config.distill_alpha * soft_distillation(
                logits, teacher_logits, config.distill_tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window_loss += loss.item() * len(index)
        window_correct += int((logits.argmax(1) == batch_labels).sum())
        window_count += len(index)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - start
            log.losses.append(window_loss / window_count)
            log.final_accuracy = window_correct / window_count
            if progress:
                eta = elapsed / (step + 1) * (config.steps - step - 1)
                progress(
                    f"step {step + 1}/{config.steps}  loss {log.losses[-1]:.3f}  "
                    f"id-acc {log.final_accuracy:.2f}  lr {learning_rate(step, config):.2e}  "
                    f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left"
                )
            window_loss, window_correct, window_count = 0.0, 0, 0
    log.steps = config.steps
    log.seconds = time.perf_counter() - start
    model.eval()
    return log
