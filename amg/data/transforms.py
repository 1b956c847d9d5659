"""Image transforms: the evaluation transform, and batched training augmentation on tensors.

Training augments whole batches of preloaded uint8 images in torch instead of running PIL
transforms per image in DataLoader workers: on a 2-core machine the workers would compete
with the training step for the same cores.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8_tensor(image: Image.Image, img_size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> uint8 `[3, H, W]` at `img_size` (height, width)."""
    if (image.height, image.width) != tuple(img_size):
        image = image.resize((img_size[1], img_size[0]), Image.Resampling.BILINEAR)
    return TF.pil_to_tensor(image.convert("RGB"))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., 3, H, W]` -> float, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def eval_transform(img_size: tuple[int, int]) -> Callable[[Image.Image], torch.Tensor]:
    return lambda image: normalize(to_uint8_tensor(image, img_size))


class BatchAugment:
    """Random horizontal flip, pad-and-crop and random erasing on a normalised batch.

    The standard Re-ID recipe (TransReID, torchreid): flip p=0.5, pad 10 px at 256x128
    (scaled with the image), random erasing p=0.5 with area 2-40% and aspect 0.3-3.3.
    """

    def __init__(self, img_size: Sequence[int], flip_p: float = 0.5, pad_fraction: float = 10 / 256,
                 erase_p: float = 0.5) -> None:
        self.height, self.width = int(img_size[0]), int(img_size[1])
        self.pad = max(1, round(self.height * pad_fraction))
        self.flip_p, self.erase_p = flip_p, erase_p

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = images.shape[0]
        flip = torch.rand(batch, generator=generator) < self.flip_p
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        padded = torch.nn.functional.pad(images, [self.pad] * 4)
        offsets = torch.randint(0, 2 * self.pad + 1, (batch, 2), generator=generator)
        out = torch.stack([
            padded[i, :, dy:dy + self.height, dx:dx + self.width]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ])
        for i in torch.nonzero(torch.rand(batch, generator=generator) < self.erase_p).flatten().tolist():
            self._erase(out[i], generator)
        return out

    def _erase(self, image: torch.Tensor, generator: torch.Generator) -> None:
        area = self.height * self.width
        for _ in range(10):  # rejection-sample a box that fits, as torchvision's RandomErasing
            target = area * float(torch.empty(1).uniform_(0.02, 0.4, generator=generator))
            aspect = float(torch.empty(1).uniform_(0.3, 3.3, generator=generator))
            h = int(round((target * aspect) ** 0.5))
            w = int(round((target / aspect) ** 0.5))
            if h < self.height and w < self.width:
                y = int(torch.randint(0, self.height - h + 1, (1,), generator=generator))
                x = int(torch.randint(0, self.width - w + 1, (1,), generator=generator))
                image[:, y:y + h, x:x + w] = torch.randn(3, h, w, generator=generator)
                return
