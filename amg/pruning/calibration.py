"""The calibration images that heads and tokens are scored on (statistics: `scores.CalibrationStats`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from amg.data.layout import ReIDDataset, relabel_pids
from amg.data.preload import preload_images
from amg.errors import InputError
from amg.model.vit import ReIDViT
from amg.pruning import scores as S
from amg.pruning.calibration_loss import default_teacher
from amg.pruning.policies import CALIBRATION_BATCH

Progress = Callable[[str], None]


@dataclass
class CalibrationImages:
    """uint8 images (+ training labels and camera ids) used to score heads and tokens."""

    images: torch.Tensor
    labels: list[int] | None = None
    camids: list[int] | None = None
    description: dict[str, Any] = field(default_factory=dict)
    loss: str = "id"
    teacher: ReIDViT | None = None
    batch_size: int = CALIBRATION_BATCH  # token scores are summed over batches of this size
    seed: int = 0  # the "reference" loss's flips and dropout

    @classmethod
    def from_dataset(cls, dataset: ReIDDataset, img_size: tuple[int, int], count: int = 256, seed: int = 0,
                     progress: Progress | None = None, batch_size: int = CALIBRATION_BATCH,
                     loss: str = "id") -> CalibrationImages:
        """`count` random training images (by `seed`) with their contiguous training labels."""
        if count < 1:
            raise InputError(f"calibration needs at least one image, got {count}")
        labels, _ = relabel_pids(dataset.train)
        count = min(count, len(dataset.train))
        chosen = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        samples = [dataset.train[i] for i in chosen]
        if progress:
            progress(f"loading {count} calibration images from {dataset.root}")
        return cls(preload_images(samples, img_size), [labels[i] for i in chosen], [s.camid for s in samples],
                   {"dataset": dataset.identity, "split": "train", "images": count, "seed": seed, "loss": loss,
                    "batch": batch_size}, loss=loss, batch_size=batch_size, seed=seed)

    def with_teacher(self, model: ReIDViT) -> CalibrationImages:
        """These images with `model` as the teacher, where the loss wants one and none is set."""
        teacher = default_teacher(self.loss, self.teacher, model)
        return self if teacher is self.teacher else dataclasses.replace(self, teacher=teacher)

    def run(self, model: ReIDViT, progress: Progress | None, gradients: bool = True,
            mlp: bool = False) -> S.CalibrationStats:
        return S.calibrate(model, self.images, self.labels, self.camids, self.loss, self.teacher,
                           batch_size=self.batch_size, gradients=gradients, progress=progress, seed=self.seed,
                           mlp=mlp)
