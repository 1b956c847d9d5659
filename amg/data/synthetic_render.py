"""Drawing one image of the synthetic Re-ID set: procedural people, occluders, backgrounds, cameras.

Identities are procedural people: a body plan (build, height) and appearance (skin, hair or
hat, top colour and texture, sleeves, trousers / shorts / skirt, shoes, bag) drawn from the
identity's own random stream. Each image shows the person through one camera: the camera's
colour cast, blur, noise and background, plus a per-image view (front / back / side), walking
pose, scale, shift and background clutter. An occluded image is the same image with a vehicle,
another pedestrian or an object covering part of the body.

`amg.data.synthetic` decides which images make up the data set and writes them; this module
draws each one, with the primitives of `amg.data.synthetic_canvas` and the occluders of
`amg.data.synthetic_occluders`. Every random number comes from `stream_rng`, so an image
depends only on the config and its keys, never on what was drawn before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from amg.data.synthetic_canvas import (
    PATTERNS,
    SUPERSAMPLE,
    Canvas,
    Shape,
    ellipse,
    polygon,
    random_colour,
    rect,
    rgb_tuple,
)
from amg.data.synthetic_occluders import draw_occluder

if TYPE_CHECKING:  # annotations only: amg.data.synthetic imports this module
    from amg.data.synthetic import SynthConfig

# Independent random streams, so adding a parameter to one never changes another. The data
# set's own streams (split, extra) are numbered here too, so no two can share a number.
STREAM_IDENTITY, STREAM_CAMERA, STREAM_IMAGE, STREAM_OCCLUDER, STREAM_SPLIT, STREAM_EXTRA = range(6)

SKIN_TONES = np.array([[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66],
                       [141, 85, 36], [95, 60, 35]], dtype=float)
HAIR_COLOURS = np.array([[20, 17, 15], [60, 40, 25], [110, 75, 40], [170, 130, 70],
                         [200, 180, 140], [120, 120, 120]], dtype=float)
SIDE_VIEW_NARROWING = 0.72  # a body seen from the side is narrower than from the front


@dataclass(frozen=True)
class Identity:
    skin: np.ndarray
    hair: np.ndarray
    hair_style: str  # short | long | bald | hat
    hat: np.ndarray
    top: np.ndarray
    top_second: np.ndarray
    pattern: str
    pattern_period: float
    long_sleeves: bool
    bottom: np.ndarray
    bottom_style: str  # trousers | shorts | skirt
    shoes: np.ndarray
    bag: str  # none | backpack | shoulder
    bag_colour: np.ndarray
    build: float  # width factor
    leg_ratio: float


@dataclass(frozen=True)
class Camera:
    gains: np.ndarray
    brightness: float
    blur: float
    noise: float
    background: np.ndarray
    ground: np.ndarray


def stream_rng(config: SynthConfig, *stream: int) -> np.random.Generator:
    """The random generator of one stream (a STREAM_* number, then keys such as a pid)."""
    return np.random.default_rng((config.seed, *stream))


def make_identity(config: SynthConfig, pid: int) -> Identity:
    rng = stream_rng(config, STREAM_IDENTITY, pid)
    return Identity(
        skin=SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 6, 3),
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.normal(0, 8, 3),
        hair_style=str(rng.choice(["short", "long", "bald", "hat"], p=[0.45, 0.3, 0.1, 0.15])),
        hat=random_colour(rng),
        top=random_colour(rng),
        top_second=random_colour(rng),
        pattern=str(rng.choice(PATTERNS, p=[0.4, 0.15, 0.1, 0.1, 0.1, 0.15])),
        pattern_period=float(rng.uniform(0.035, 0.07)),
        long_sleeves=bool(rng.random() < 0.5),
        bottom=random_colour(rng) * 0.8,
        bottom_style=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.6, 0.25, 0.15])),
        shoes=random_colour(rng) * 0.6,
        bag=str(rng.choice(["none", "backpack", "shoulder"], p=[0.5, 0.3, 0.2])),
        bag_colour=random_colour(rng),
        build=float(rng.uniform(0.85, 1.15)),
        leg_ratio=float(rng.uniform(0.9, 1.1)),
    )


def make_camera(config: SynthConfig, camera: int) -> Camera:
    rng = stream_rng(config, STREAM_CAMERA, camera)
    return Camera(
        gains=rng.uniform(0.85, 1.15, 3),
        brightness=float(rng.uniform(-15, 15)),
        blur=float(rng.uniform(0.0, 1.3)),
        noise=float(rng.uniform(1.0, 7.0)),
        background=rng.uniform(60, 200, 3),
        ground=rng.uniform(50, 160, 3),
    )


def _background(rng: np.random.Generator, camera: Camera, height: int, width: int) -> Image.Image:
    image = Image.new("RGB", (width, height), rgb_tuple(camera.background))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.55, 0.8))
    draw.rectangle([0, horizon, width, height], fill=rgb_tuple(camera.ground))
    for _ in range(int(rng.integers(2, 7))):  # clutter: walls, windows, poles, signs
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        colour = camera.background * rng.uniform(0.6, 1.3) + rng.normal(0, 25, 3)
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=rgb_tuple(np.clip(colour, 0, 255)))
    return image


@dataclass(frozen=True)
class _Pose:
    """Where and how one person stands in the canvas, in canvas pixels."""

    cx: float  # centre x
    top: float
    h: float  # height
    view: str  # front | back | side
    u: float  # half torso width: the unit of every body part's width
    swing: float  # walking phase in -1..1: leg spread and arm swing

    def y(self, fraction: float) -> float:
        """The y that lies `fraction` of the person's height below the top of the head."""
        return self.top + fraction * self.h

    @property
    def hips(self) -> float:
        return self.y(0.5)

    @property
    def narrowing(self) -> float:
        return SIDE_VIEW_NARROWING if self.view == "side" else 1.0

    def leg_spread(self, side: int) -> float:
        """How far the foot on `side` (-1 left, 1 right) is from the centre line."""
        return side * (0.45 * self.u + self.swing * side * 0.35 * self.u)


def _random_pose(rng: np.random.Generator, canvas: Canvas, ident: Identity) -> _Pose:
    H, W = canvas.height, canvas.width
    h = H * rng.uniform(0.8, 0.96)
    top = rng.uniform(0.01, 0.99 - h / H) * H
    cx = W * (0.5 + rng.uniform(-0.08, 0.08))
    view = str(rng.choice(["front", "back", "side"]))
    u = 0.105 * h * ident.build * (SIDE_VIEW_NARROWING if view == "side" else 1.0)
    swing = rng.uniform(-1, 1)
    return _Pose(cx=cx, top=top, h=h, view=view, u=u, swing=swing)


def _leg(pose: _Pose, side: int, y_end: float) -> Shape:
    """One leg (or the clothing on it) from the hips down to `y_end`, swung by the walking phase."""
    cx, u, hips, spread = pose.cx, pose.u, pose.hips, pose.leg_spread(side)
    return polygon([(cx + side * 0.05 * u, hips), (cx + side * 0.95 * u, hips),
                     (cx + spread + side * 0.45 * u, y_end), (cx + spread - side * 0.05 * u, y_end)])


def _draw_legs(canvas: Canvas, ident: Identity, pose: _Pose) -> None:
    """Legs with trousers or shorts and shoes; a skirt over both legs."""
    cx, u, h = pose.cx, pose.u, pose.h
    feet = min(pose.y(0.5 + 0.45 * ident.leg_ratio), pose.top + h)
    bottom_end = {"trousers": feet, "shorts": pose.y(0.68), "skirt": pose.hips}[ident.bottom_style]
    for side in (-1, 1):
        canvas.fill(_leg(pose, side, feet), ident.skin)
        if bottom_end > pose.hips:
            canvas.fill(_leg(pose, side, bottom_end), ident.bottom)
        foot = cx + pose.leg_spread(side) + side * 0.2 * u
        canvas.fill(ellipse([foot - 0.32 * u, feet - 0.05 * h, foot + 0.32 * u, feet]), ident.shoes)
    if ident.bottom_style == "skirt":
        waist, hem = pose.hips - 0.02 * h, pose.y(0.7)
        canvas.fill(polygon([(cx - u, waist), (cx + u, waist), (cx + 1.35 * u, hem), (cx - 1.35 * u, hem)]),
                    ident.bottom)


def _draw_arms(canvas: Canvas, ident: Identity, pose: _Pose) -> None:
    """Arms beside the torso, or behind it in side view, with short or long sleeves."""
    cx, u, y = pose.cx, pose.u, pose.y
    arm_w = 0.38 * u
    for side in (-1, 1):
        offset = side * (u + arm_w * 0.5) if pose.view != "side" else side * 0.2 * u
        shift = pose.swing * side * 0.25 * u
        x0, x1 = cx + offset - arm_w / 2 + shift, cx + offset + arm_w / 2 + shift
        canvas.fill(rect(x0, y(0.15), x1, y(0.49)), ident.skin)
        canvas.fill(rect(x0, y(0.15), x1, y(0.47) if ident.long_sleeves else y(0.27)), ident.top)


def _draw_torso(canvas: Canvas, ident: Identity, pose: _Pose) -> None:
    """The top with its texture, drawn over the arms' inner edges."""
    cx, u = pose.cx, pose.u
    period = ident.pattern_period * pose.h
    canvas.fill(rect(cx - u, pose.y(0.14), cx + u, pose.hips + 0.01 * pose.h), ident.top, ident.pattern,
                ident.top_second, period)


def _draw_bag(canvas: Canvas, ident: Identity, pose: _Pose) -> None:
    """A backpack (only its straps from the front) or a shoulder bag on its strap."""
    cx, u, y, colour = pose.cx, pose.u, pose.y, ident.bag_colour
    if ident.bag == "backpack":
        if pose.view == "back":
            canvas.fill(rect(cx - 0.8 * u, y(0.17), cx + 0.8 * u, y(0.43)), colour)
        elif pose.view == "side":
            canvas.fill(rect(cx - 1.6 * u, y(0.16), cx - 0.9 * u, y(0.42)), colour)
        else:
            for side in (-1, 1):
                strap = cx + side * 0.55 * u
                canvas.fill(rect(strap - 0.12 * u, y(0.14), strap + 0.12 * u, y(0.33)), colour)
    elif ident.bag == "shoulder":
        strap_width = max(1, int(0.1 * u))
        canvas.fill(lambda d: d.line([(cx - u, y(0.15)), (cx + u, y(0.42))], fill=255, width=strap_width), colour)
        canvas.fill(rect(cx + 0.8 * u, y(0.4), cx + 1.5 * u, y(0.52)), colour)


def _draw_head(canvas: Canvas, ident: Identity, pose: _Pose) -> None:
    """The head (as wide from every side: undo the side view's narrowing) and its hair or hat."""
    y = pose.y
    head_r = 0.6 * pose.u / pose.narrowing * 0.9
    head = [pose.cx - head_r, y(0.02), pose.cx + head_r, y(0.14)]
    canvas.fill(ellipse(head), ident.skin)
    if ident.hair_style == "hat":
        canvas.fill(rect(head[0] - 0.1 * pose.u, y(0.015), head[2] + 0.1 * pose.u, y(0.055)), ident.hat)
    elif ident.hair_style != "bald":
        # the hair's lower edge: the hairline from the front, the nape from behind
        cover = 0.14 if pose.view == "back" else 0.055
        chord_bottom = y(cover) + (y(0.14) - y(0.02)) * 0.5
        canvas.fill(lambda d: d.chord([head[0], head[1], head[2], chord_bottom], 180, 360, fill=255), ident.hair)
        if pose.view == "back":
            canvas.fill(ellipse(head), ident.hair)
        if ident.hair_style == "long" and pose.view != "front":
            canvas.fill(rect(head[0], y(0.07), head[2], y(0.22)), ident.hair)


def _draw_person(canvas: Canvas, ident: Identity, rng: np.random.Generator) -> tuple[float, float, float]:
    """Draw one person, back to front; returns (centre x, top y, height) of its box."""
    pose = _random_pose(rng, canvas, ident)
    for draw_part in (_draw_legs, _draw_arms, _draw_torso, _draw_bag, _draw_head):
        draw_part(canvas, ident, pose)
    return pose.cx, pose.top, pose.h


def _occlude(canvas: Canvas, config: SynthConfig, image_key: tuple[int, ...],
             box: tuple[float, float, float]) -> float:
    """Add an occluder hiding a fraction of the person within the configured band; returns it."""
    rng = stream_rng(config, STREAM_OCCLUDER, *image_key)
    # Re-draw until the hidden fraction lands in the configured band (a few tries at most).
    base_image, base_mask = canvas.image.copy(), canvas.mask.copy()
    occluded = 0.0
    for _ in range(12):
        canvas.image, canvas.mask = base_image.copy(), base_mask.copy()
        occluded = draw_occluder(canvas, rng, box, config)
        if config.occlusion_min <= occluded <= config.occlusion_max:
            break
    return occluded


def _apply_camera(image: Image.Image, camera: Camera, rng: np.random.Generator) -> Image.Image:
    if camera.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur * SUPERSAMPLE * rng.uniform(0.7, 1.3)))
    pixels = np.asarray(image, dtype=float)
    pixels = pixels * camera.gains * rng.uniform(0.9, 1.1) + camera.brightness
    pixels += rng.normal(0, camera.noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render(config: SynthConfig, identity: Identity, camera_index: int, image_key: tuple[int, ...],
           occlude: bool = False) -> tuple[Image.Image, float]:
    """One image of `identity` seen by camera `camera_index`; returns (image, occluded fraction).

    `image_key` selects the per-image random stream; the occluded variant of an image uses
    the same key, so it shows the same person, pose and background with an occluder added.
    """
    rng = stream_rng(config, STREAM_IMAGE, *image_key)
    camera = make_camera(config, camera_index)
    H, W = config.height * SUPERSAMPLE, config.width * SUPERSAMPLE
    canvas = Canvas(H, W, _background(rng, camera, H, W))
    box = _draw_person(canvas, identity, rng)
    occluded = _occlude(canvas, config, image_key, box) if occlude else 0.0
    image = _apply_camera(canvas.image, camera, rng)
    return image.resize((config.width, config.height), Image.Resampling.LANCZOS), occluded


def render_junk(config: SynthConfig, identity: Identity, camera_index: int, image_key: tuple[int, ...],
                cut: float) -> Image.Image:
    """A bad detection: the `render` image pushed right by `cut` of its width, so a sliver of the
    person shows and the camera's plain background fills the rest."""
    image, _ = render(config, identity, camera_index, image_key)
    width = image.width
    shift = int(width * cut)
    shifted = Image.new("RGB", image.size, rgb_tuple(make_camera(config, camera_index).background))
    shifted.paste(image.crop((0, 0, width - shift, image.height)), (shift, 0))
    return shifted
