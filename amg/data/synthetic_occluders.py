"""Occluders of the synthetic Re-ID images: a vehicle, another pedestrian or an object drawn
over part of the person.

Each occluder is drawn on a `Canvas` with `Canvas.cover`, so the pixels it hides stop counting
as the person's; `draw_occluder` picks one and reports the fraction of the person it hid.
`amg.data.synthetic_render` re-draws until that fraction lands in the configured band.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from amg.data.synthetic_canvas import Canvas, ellipse, random_colour, rect

if TYPE_CHECKING:  # annotations only: amg.data.synthetic imports this module, via synthetic_render
    from amg.data.synthetic import SynthConfig


def _draw_vehicle(canvas: Canvas, rng: np.random.Generator, box: tuple[float, float, float],
                  target: float, colour: np.ndarray) -> None:
    """From the bottom, full width: cars, bikes, fences; a darker band marks its top edge."""
    _, top, h = box
    W = canvas.width
    y0 = top + h * (1 - target * rng.uniform(0.9, 1.2))
    canvas.cover(rect(-1, y0, W + 1, top + h + 5), colour)
    canvas.cover(rect(-1, y0, W + 1, y0 + 0.05 * h), colour * 0.6)


def _draw_pedestrian(canvas: Canvas, rng: np.random.Generator, box: tuple[float, float, float],
                     target: float, colour: np.ndarray) -> None:
    """Another person's body and head, from one side."""
    cx, top, h = box
    W = canvas.width
    side = rng.choice([-1, 1])
    edge = cx + side * (0.5 - target) * 0.5 * W * rng.uniform(0.8, 1.4)
    x0, x1 = (edge, W + 1) if side > 0 else (-1, edge)
    canvas.cover(rect(x0, top + 0.1 * h, x1, top + h + 5), colour)
    middle = (x0 + x1) / 2
    canvas.cover(ellipse([middle - 0.1 * W, top - 0.02 * h, middle + 0.1 * W, top + 0.12 * h]), random_colour(rng))


def _draw_object(canvas: Canvas, rng: np.random.Generator, box: tuple[float, float, float],
                 target: float, colour: np.ndarray) -> None:
    """A box, sign or bin in front of the middle of the body."""
    cx, top, h = box
    W = canvas.width
    side_len = math.sqrt(target) * 0.9
    bw, bh = side_len * W * rng.uniform(0.9, 1.3), side_len * h * rng.uniform(0.9, 1.2)
    x0 = cx - bw / 2 + rng.uniform(-0.15, 0.15) * W
    y0 = top + h * rng.uniform(0.25, 0.95) - bh / 2
    canvas.cover(rect(x0, y0, x0 + bw, y0 + bh), colour)


_OCCLUDERS = {"vehicle": _draw_vehicle, "pedestrian": _draw_pedestrian, "object": _draw_object}


def draw_occluder(canvas: Canvas, rng: np.random.Generator, box: tuple[float, float, float],
                  config: SynthConfig) -> float:
    """Draw an occluder over the person; returns the fraction of the person's pixels hidden."""
    person_before = canvas.person_pixels()
    kind = str(rng.choice(list(_OCCLUDERS)))
    target = rng.uniform(config.occlusion_min, config.occlusion_max)
    _OCCLUDERS[kind](canvas, rng, box, target, random_colour(rng))
    return 1.0 - canvas.person_pixels() / max(person_before, 1)
