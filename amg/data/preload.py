"""Decode a split once into one uint8 tensor: small Re-ID crops fit in memory many times over."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from amg.data.layout import Sample, read_image
from amg.data.transforms import to_uint8_tensor
from amg.errors import InputError


def preload_images(samples: Sequence[Sample], img_size: tuple[int, int],
                   progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """uint8 `[N, 3, H, W]`; a corrupt file raises DatasetError naming it (from read_image)."""
    if not samples:
        raise InputError("no images to load")
    out = torch.empty((len(samples), 3, *img_size), dtype=torch.uint8)
    for index, sample in enumerate(samples):
        out[index] = to_uint8_tensor(read_image(sample.path), img_size)
        if progress and (index + 1) % 2000 == 0:
            progress(f"loaded {index + 1}/{len(samples)} images")
    return out
