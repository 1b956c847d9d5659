"""Drawing primitives of the synthetic Re-ID images: a canvas that tracks the person's pixels,
shape helpers and colour helpers.

`amg.data.synthetic_render` draws people and backgrounds with these and
`amg.data.synthetic_occluders` draws occluders; neither draws on Pillow directly except
through a `Shape`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from amg.errors import InputError

SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges without per-shape AA

# The textures `Canvas.fill` can paint a shape with.
PATTERNS = ("solid", "hstripes", "vstripes", "check", "dots", "two_tone")

# Draws one shape in white on a mask; `Canvas.fill` paints the mask's pixels.
Shape = Callable[[ImageDraw.ImageDraw], None]


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A clothing colour: uniformly spread hue, mixed saturation and value (incl. greys)."""
    hue, sat, val = rng.random(), rng.choice([0.0, 0.35, 0.7, 0.95]), rng.uniform(0.2, 0.95)
    sat = min(1.0, max(0.0, sat + rng.normal(0, 0.08)))
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    return rgb * 255


def rgb_tuple(colour: np.ndarray) -> tuple[int, ...]:
    """A colour array as the integer tuple Pillow takes."""
    return tuple(int(c) for c in colour)


class Canvas:
    """An RGB canvas plus a mask of the person's pixels (to measure occlusion)."""

    def __init__(self, height: int, width: int, background: Image.Image) -> None:
        self.image = background
        self.mask = Image.new("L", (width, height), 0)
        self.height, self.width = height, width

    def fill(self, draw_shape: Shape, colour: np.ndarray, pattern: str = "solid",
             second: np.ndarray | None = None, period: float = 1.0, person: bool = True) -> None:
        shape = Image.new("L", (self.width, self.height), 0)
        draw_shape(ImageDraw.Draw(shape))
        if pattern == "solid" or second is None:  # the common case: no texture array needed
            self.image.paste(rgb_tuple(np.clip(colour, 0, 255)), mask=shape)
        else:
            self.image.paste(Image.fromarray(self._texture(colour, pattern, second, period)), mask=shape)
        # an occluder hides the person's pixels under it
        self.mask.paste(255 if person else 0, mask=shape)

    def cover(self, draw_shape: Shape, colour: np.ndarray) -> None:
        """Paint an occluder: its pixels stop counting as the person's."""
        self.fill(draw_shape, colour, person=False)

    def person_pixels(self) -> int:
        return int(np.asarray(self.mask, dtype=bool).sum())

    def _texture(self, colour: np.ndarray, pattern: str, second: np.ndarray, period: float) -> np.ndarray:
        yy, xx = np.mgrid[0:self.height, 0:self.width].astype(float)
        if pattern == "hstripes":
            choice = (yy // period) % 2 == 1
        elif pattern == "vstripes":
            choice = (xx // period) % 2 == 1
        elif pattern == "check":
            choice = ((yy // period) + (xx // period)) % 2 == 1
        elif pattern == "dots":
            choice = ((yy % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period / 3.2) ** 2
        elif pattern == "two_tone":
            choice = yy > self.height * 0.36
        else:
            raise InputError(f"unknown pattern {pattern!r}")
        first = np.clip(colour, 0, 255).astype(np.uint8)
        other = np.clip(second, 0, 255).astype(np.uint8)
        return np.where(choice[..., None], other, first)


def rect(x0: float, y0: float, x1: float, y1: float) -> Shape:
    return lambda d: d.rectangle([x0, y0, x1, y1], fill=255)


def ellipse(box: list[float]) -> Shape:
    return lambda d: d.ellipse(box, fill=255)


def polygon(points: list[tuple[float, float]]) -> Shape:
    return lambda d: d.polygon(points, fill=255)
