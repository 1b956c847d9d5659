"""Training and fine-tuning: ID loss (label smoothing) + batch-hard triplet, AdamW, warm-up + cosine."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from amg.data.sampler import PKSampler, rank_share
from amg.data.transforms import BatchAugment, normalize
from amg.errors import InputError
from amg.files import write_atomic
from amg.model.vit import ReIDViT
from amg.train import distributed
from amg.train.config import TrainConfig
from amg.train.losses import batch_hard_triplet, id_loss, soft_distillation

Progress = Callable[[str], None]
CHECKPOINT_EVERY = 100  # steps between training checkpoints (when a checkpoint path is given)


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
               teacher: ReIDViT | None = None, checkpoint: Path | None = None,
               checkpoint_every: int = CHECKPOINT_EVERY) -> TrainLog:
    """Train `model` in place on preloaded uint8 `images` with contiguous `labels`.

    With a `teacher` (same identities), its logits are soft targets (`distill_alpha`, `distill_tau`).
    With a `checkpoint` path, the state is saved there every `checkpoint_every` steps and a
    run finding one there continues from it, to the same final weights as an uninterrupted
    run (the file is removed when training ends).
    Under torchrun every process calls this with the same arguments: together they train one
    model on the global PK batch (`amg.train.distributed`); rank 0 alone reports and checkpoints.
    """
    _check_training_inputs(model, images, labels, camids, teacher)
    world = distributed.join()
    share = torch.tensor(rank_share(config.num_identities, config.num_instances, world.rank, world.size))
    progress = progress if world.is_main else None  # one process reports for all
    if progress and world.backend:
        progress(f"data parallel over {world.size} processes ({world.backend}): {config.num_identities} identities "
                 f"per batch, {config.num_identities // world.size} per process")
    if teacher is not None:
        teacher.eval()
    with distributed.data_parallel(model, teacher) as student:
        optimizer = _adamw(model, config)
        batches = _training_batches(model, images, labels, camids, config, share)
        log, window = TrainLog(), _LogWindow()
        first = _resume(checkpoint, model, optimizer, config, log, window, progress) if checkpoint else 0
        for _ in range(first):  # the batches already trained on: same sampler and augmentation draws
            next(batches)
        start = time.perf_counter()
        student.train()
        for step in range(first, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            batch, batch_labels, batch_camids = next(batches)
            batch_labels = distributed.gather_rows(batch_labels)  # the losses are over the global batch
            loss, logits = _reid_loss(student, batch, batch_labels, batch_camids, config, teacher)
            if not torch.isfinite(loss):
                raise InputError(f"training diverged at step {step + 1}: the loss is {loss.item()}; "
                                 f"lower the learning rate (now {config.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window.add(loss.item(), logits, batch_labels)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                window.record(log)
                window = _LogWindow()
            if checkpoint and world.is_main and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
                _save_checkpoint(checkpoint, step + 1, model, optimizer, config, log, window)
            if progress and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
                _report_progress(progress, log, step, config, elapsed=time.perf_counter() - start, first=first)
    log.steps = config.steps
    log.seconds = time.perf_counter() - start
    model.eval()
    if checkpoint and world.is_main:
        Path(checkpoint).unlink(missing_ok=True)
    return log


def _save_checkpoint(path: Path, steps: int, model: ReIDViT, optimizer: torch.optim.Optimizer,
                     config: TrainConfig, log: TrainLog, window: _LogWindow) -> None:
    state = {"steps": steps, "config": config.to_dict(), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "losses": log.losses, "accuracy": log.final_accuracy, "window": asdict(window)}
    write_atomic(path, lambda stream: torch.save(state, stream))


def _resume(path: Path, model: ReIDViT, optimizer: torch.optim.Optimizer, config: TrainConfig,
            log: TrainLog, window: _LogWindow, progress: Progress | None) -> int:
    """Load a checkpoint of this same training into `model` and `optimizer`; its step count (0: none)."""
    if not Path(path).is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise InputError(f"training checkpoint {path} cannot be read ({error}); delete it to start over") from error
    if state.get("config") != config.to_dict():
        raise InputError(f"training checkpoint {path} was made with other settings; delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    log.losses, log.final_accuracy = list(state["losses"]), state["accuracy"]
    for name, value in state["window"].items():
        setattr(window, name, value)
    if progress:
        progress(f"resuming from {path} at step {state['steps']}/{config.steps}")
    return int(state["steps"])


def _check_training_inputs(model: ReIDViT, images: torch.Tensor, labels: list[int], camids: list[int],
                           teacher: ReIDViT | None) -> None:
    if model.classifier is None or model.num_classes < max(labels) + 1:
        raise InputError(
            f"model classifier has {model.num_classes} classes but labels go up to {max(labels)}"
        )
    if not len(images) == len(labels) == len(camids):
        raise InputError("images, labels and camids must have the same length")
    if teacher is not None and (teacher.classifier is None or teacher.num_classes != model.num_classes):
        raise InputError("the distillation teacher needs a classifier over the same identities as the model")


def _adamw(model: ReIDViT, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # no weight decay on norms, biases and embeddings (timm's no_weight_decay rule)
            (no_decay if parameter.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "sie_embed"))
             else decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def _training_batches(model: ReIDViT, images: torch.Tensor, labels: list[int], camids: list[int],
                      config: TrainConfig, share: torch.Tensor):
    """Endless (augmented images, labels, camids or None) PK batches: the `share` positions of each
    (this process's identities), on the model's device."""
    # A private generator: the augmentation draws must not depend on (or disturb) the global RNG.
    generator = torch.Generator().manual_seed(config.seed)
    augment = BatchAugment(model.config.img_size, erase_p=config.erase_p)
    label_tensor = torch.tensor(labels)
    camid_tensor = torch.tensor(camids)
    needs_camids = model.sie_embed is not None
    device = next(model.parameters()).device
    for index in _pk_batches(labels, config):
        # Augmented whole, so that every process draws what a single process would, then cut.
        batch = augment(normalize(images[index]), generator)[share].to(device)
        index = index[share]
        yield batch, label_tensor[index].to(device), camid_tensor[index].to(device) if needs_camids else None


def _reid_loss(model: ReIDViT, batch: torch.Tensor, batch_labels: torch.Tensor, batch_camids: torch.Tensor | None,
               config: TrainConfig, teacher: ReIDViT | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): ID + triplet loss, blended with the teacher's soft targets when there is one.

    `batch_labels` are the global batch's: under data parallelism the model's logits are (its
    neck sees the gathered features), and the features and the teacher's logits are gathered here.
    """
    logits, features = model(batch, batch_camids)
    features = distributed.gather_rows(features)
    loss = id_loss(logits, batch_labels, config.label_smoothing) + batch_hard_triplet(
        features, batch_labels, config.triplet_margin
    )
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = distributed.gather_rows(teacher_classify(teacher, batch, batch_camids))
        loss = (1 - config.distill_alpha) * loss + config.distill_alpha * soft_distillation(
            logits, teacher_logits, config.distill_tau)
    return loss, logits


@dataclass
class _LogWindow:
    """Loss and ID accuracy summed over the steps since the last log line."""

    loss_sum: float = 0.0  # weighted by batch size
    correct: int = 0
    count: int = 0

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss * len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.count += len(labels)

    def record(self, log: TrainLog) -> None:
        log.losses.append(self.loss_sum / self.count)
        log.final_accuracy = self.correct / self.count


def _report_progress(progress: Progress, log: TrainLog, step: int, config: TrainConfig, elapsed: float,
                     first: int = 0) -> None:
    eta = elapsed / (step + 1 - first) * (config.steps - step - 1)
    progress(
        f"step {step + 1}/{config.steps}  loss {log.losses[-1]:.3f}  "
        f"id-acc {log.final_accuracy:.2f}  lr {learning_rate(step, config):.2e}  "
        f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left"
    )
