"""A deterministic synthetic person Re-ID data set in the Market-1501 file layout.

Identities are procedural people: a body plan (build, height) and appearance (skin, hair or
hat, top colour and texture, sleeves, trousers / shorts / skirt, shoes, bag) drawn from the
identity's own random stream. Each image shows the person through one camera: the camera's
colour cast, blur, noise and background, plus a per-image view (front / back / side), walking
pose, scale, shift and background clutter. The holistic query split is `query/`; the same
query images with an occluder covering 20-60% of the body form `query_occluded/`, as in
Occluded-Duke. Pid 0 marks distractors and -1 junk crops in the gallery, as in Market-1501.

Everything is drawn from `numpy.random.default_rng((seed, stream, ...))`, so the same
config gives byte-identical files on any machine with the same Pillow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from amg.errors import InputError

# Bump whenever a change here changes the images, so cached data sets are regenerated.
GENERATOR_VERSION = 3
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges without per-shape AA
JPEG_QUALITY = 92
MANIFEST = "synthetic.json"

# Independent random streams, so adding a parameter to one never changes another.
_IDENTITY, _CAMERA, _IMAGE, _OCCLUDER, _SPLIT, _EXTRA = range(6)

SKIN_TONES = np.array([[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66],
                       [141, 85, 36], [95, 60, 35]], dtype=float)
HAIR_COLOURS = np.array([[20, 17, 15], [60, 40, 25], [110, 75, 40], [170, 130, 70],
                         [200, 180, 140], [120, 120, 120]], dtype=float)
PATTERNS = ("solid", "hstripes", "vstripes", "check", "dots", "two_tone")


@dataclass(frozen=True)
class SynthConfig:
    train_ids: int = 150
    test_ids: int = 150
    images_per_id: int = 16
    num_cameras: int = 6
    queries_per_id: int = 4  # at most one per camera the identity appears in
    distractors: int = 100  # pid 0 gallery images of people outside the test set
    junk: int = 40  # pid -1 gallery images: bad detections, mostly background
    train_occluded_fraction: float = 0.1  # Occluded-Duke's training set has some occlusion too
    occlusion_min: float = 0.2
    occlusion_max: float = 0.6
    height: int = 128
    width: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_ids < 2 or self.test_ids < 2:
            raise InputError("need at least 2 training and 2 test identities")
        if not 2 <= self.num_cameras <= 6:
            raise InputError("num_cameras must be 2..6: the files follow Market-1501, which has 6 cameras")
        if self.images_per_id < 2 * self.num_cameras:
            raise InputError(
                f"images_per_id ({self.images_per_id}) must be at least 2 x num_cameras "
                f"({self.num_cameras}) so every query keeps a cross-camera match in the gallery"
            )
        if not 0 <= self.occlusion_min < self.occlusion_max <= 1:
            raise InputError("need 0 <= occlusion_min < occlusion_max <= 1")


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


def _rng(config: SynthConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng((config.seed, *stream))


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A clothing colour: uniformly spread hue, mixed saturation and value (incl. greys)."""
    hue, sat, val = rng.random(), rng.choice([0.0, 0.35, 0.7, 0.95]), rng.uniform(0.2, 0.95)
    sat = min(1.0, max(0.0, sat + rng.normal(0, 0.08)))
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    return rgb * 255


def make_identity(config: SynthConfig, pid: int) -> Identity:
    rng = _rng(config, _IDENTITY, pid)
    return Identity(
        skin=SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 6, 3),
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.normal(0, 8, 3),
        hair_style=str(rng.choice(["short", "long", "bald", "hat"], p=[0.45, 0.3, 0.1, 0.15])),
        hat=_colour(rng),
        top=_colour(rng),
        top_second=_colour(rng),
        pattern=str(rng.choice(PATTERNS, p=[0.4, 0.15, 0.1, 0.1, 0.1, 0.15])),
        pattern_period=float(rng.uniform(0.035, 0.07)),
        long_sleeves=bool(rng.random() < 0.5),
        bottom=_colour(rng) * 0.8,
        bottom_style=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.6, 0.25, 0.15])),
        shoes=_colour(rng) * 0.6,
        bag=str(rng.choice(["none", "backpack", "shoulder"], p=[0.5, 0.3, 0.2])),
        bag_colour=_colour(rng),
        build=float(rng.uniform(0.85, 1.15)),
        leg_ratio=float(rng.uniform(0.9, 1.1)),
    )


def make_camera(config: SynthConfig, camera: int) -> Camera:
    rng = _rng(config, _CAMERA, camera)
    return Camera(
        gains=rng.uniform(0.85, 1.15, 3),
        brightness=float(rng.uniform(-15, 15)),
        blur=float(rng.uniform(0.0, 1.3)),
        noise=float(rng.uniform(1.0, 7.0)),
        background=rng.uniform(60, 200, 3),
        ground=rng.uniform(50, 160, 3),
    )


class _Canvas:
    """An RGB canvas plus a mask of the person's pixels (to measure occlusion)."""

    def __init__(self, height: int, width: int, background: Image.Image) -> None:
        self.image = background
        self.mask = Image.new("L", (width, height), 0)
        self.height, self.width = height, width

    def fill(self, draw_shape: Callable[[ImageDraw.ImageDraw], None], colour: np.ndarray,
             pattern: str = "solid", second: np.ndarray | None = None, period: float = 1.0,
             person: bool = True) -> None:
        shape = Image.new("L", (self.width, self.height), 0)
        draw_shape(ImageDraw.Draw(shape))
        if pattern == "solid" or second is None:  # the common case: no texture array needed
            self.image.paste(tuple(int(c) for c in np.clip(colour, 0, 255)), mask=shape)
        else:
            self.image.paste(Image.fromarray(self._texture(colour, pattern, second, period)), mask=shape)
        # an occluder hides the person's pixels under it
        self.mask.paste(255 if person else 0, mask=shape)

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


def _background(rng: np.random.Generator, camera: Camera, height: int, width: int) -> Image.Image:
    image = Image.new("RGB", (width, height), tuple(int(c) for c in camera.background))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.55, 0.8))
    draw.rectangle([0, horizon, width, height], fill=tuple(int(c) for c in camera.ground))
    for _ in range(int(rng.integers(2, 7))):  # clutter: walls, windows, poles, signs
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        colour = camera.background * rng.uniform(0.6, 1.3) + rng.normal(0, 25, 3)
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in np.clip(colour, 0, 255)))
    return image


def _draw_person(canvas: _Canvas, ident: Identity, rng: np.random.Generator) -> tuple[float, float, float]:
    """Draw one person; returns (centre x, top y, height) of its box."""
    H, W = canvas.height, canvas.width
    h = H * rng.uniform(0.8, 0.96)
    top = rng.uniform(0.01, 0.99 - h / H) * H
    cx = W * (0.5 + rng.uniform(-0.08, 0.08))
    view = str(rng.choice(["front", "back", "side"]))
    u = 0.105 * h * ident.build * (0.72 if view == "side" else 1.0)  # half torso width
    swing = rng.uniform(-1, 1)  # walking phase: leg spread and arm swing
    y = lambda f: top + f * h  # noqa: E731 - a local unit conversion reads best inline
    legs_top, feet = y(0.5), y(0.5 + 0.45 * ident.leg_ratio)
    feet = min(feet, top + h)
    fill = canvas.fill

    def rect(x0: float, y0: float, x1: float, y1: float) -> Callable[[ImageDraw.ImageDraw], None]:
        return lambda d: d.rectangle([x0, y0, x1, y1], fill=255)

    def leg(side: int, y_end: float) -> Callable[[ImageDraw.ImageDraw], None]:
        spread = side * (0.45 * u + swing * side * 0.35 * u)
        return lambda d: d.polygon(
            [(cx + side * 0.05 * u, legs_top), (cx + side * 0.95 * u, legs_top),
             (cx + spread + side * 0.45 * u, y_end), (cx + spread - side * 0.05 * u, y_end)], fill=255)

    # legs, then clothing on them
    for side in (-1, 1):
        fill(leg(side, feet), ident.skin)
        bottom_end = {"trousers": feet, "shorts": y(0.68), "skirt": legs_top}[ident.bottom_style]
        if bottom_end > legs_top:
            fill(leg(side, bottom_end), ident.bottom)
        spread = side * (0.45 * u + swing * side * 0.35 * u)
        foot = cx + spread + side * 0.2 * u
        fill(lambda d, f=foot: d.ellipse([f - 0.32 * u, feet - 0.05 * h, f + 0.32 * u, feet], fill=255),
             ident.shoes)
    if ident.bottom_style == "skirt":
        fill(lambda d: d.polygon([(cx - u, legs_top - 0.02 * h), (cx + u, legs_top - 0.02 * h),
                                  (cx + 1.35 * u, y(0.7)), (cx - 1.35 * u, y(0.7))], fill=255),
             ident.bottom)
    # arms behind the torso in side view, beside it otherwise
    arm_w = 0.38 * u
    for side in (-1, 1):
        offset = side * (u + arm_w * 0.5) if view != "side" else side * 0.2 * u
        shift = swing * side * 0.25 * u
        x0, x1 = cx + offset - arm_w / 2 + shift, cx + offset + arm_w / 2 + shift
        fill(rect(x0, y(0.15), x1, y(0.49)), ident.skin)
        fill(rect(x0, y(0.15), x1, y(0.47) if ident.long_sleeves else y(0.27)), ident.top)
    # torso with its texture
    period = ident.pattern_period * h
    fill(rect(cx - u, y(0.14), cx + u, legs_top + 0.01 * h), ident.top, ident.pattern,
         ident.top_second, period)
    if ident.bag == "backpack":
        if view == "back":
            fill(rect(cx - 0.8 * u, y(0.17), cx + 0.8 * u, y(0.43)), ident.bag_colour)
        elif view == "side":
            fill(rect(cx - 1.6 * u, y(0.16), cx - 0.9 * u, y(0.42)), ident.bag_colour)
        else:
            for side in (-1, 1):
                fill(rect(cx + side * 0.55 * u - 0.12 * u, y(0.14), cx + side * 0.55 * u + 0.12 * u, y(0.33)),
                     ident.bag_colour)
    elif ident.bag == "shoulder":
        fill(lambda d: d.line([(cx - u, y(0.15)), (cx + u, y(0.42))], fill=255, width=max(1, int(0.1 * u))),
             ident.bag_colour)
        fill(rect(cx + 0.8 * u, y(0.4), cx + 1.5 * u, y(0.52)), ident.bag_colour)
    # head and hair
    head_r = 0.6 * u / (0.72 if view == "side" else 1.0) * 0.9
    head = [cx - head_r, y(0.02), cx + head_r, y(0.14)]
    fill(lambda d: d.ellipse(head, fill=255), ident.skin)
    if ident.hair_style == "hat":
        fill(rect(head[0] - 0.1 * u, y(0.015), head[2] + 0.1 * u, y(0.055)), ident.hat)
    elif ident.hair_style != "bald":
        cover = 0.14 if view == "back" else 0.055
        fill(lambda d: d.chord([head[0], head[1], head[2], y(cover) + (y(0.14) - y(0.02)) * 0.5],
                               180, 360, fill=255), ident.hair)
        if view == "back":
            fill(lambda d: d.ellipse(head, fill=255), ident.hair)
        if ident.hair_style == "long" and view != "front":
            fill(rect(head[0], y(0.07), head[2], y(0.22)), ident.hair)
    return cx, top, h


def _draw_occluder(canvas: _Canvas, rng: np.random.Generator, box: tuple[float, float, float],
                   config: SynthConfig) -> float:
    """Draw an occluder over the person; returns the fraction of the person's pixels hidden."""
    cx, top, h = box
    person_before = np.asarray(canvas.mask, dtype=bool).sum()
    kind = str(rng.choice(["vehicle", "pedestrian", "object"]))
    target = rng.uniform(config.occlusion_min, config.occlusion_max)
    W = canvas.width
    colour = _colour(rng)
    if kind == "vehicle":  # from the bottom, full width: cars, bikes, fences
        y0 = top + h * (1 - target * rng.uniform(0.9, 1.2))
        canvas.fill(lambda d: d.rectangle([-1, y0, W + 1, top + h + 5], fill=255), colour, person=False)
        canvas.fill(lambda d: d.rectangle([-1, y0, W + 1, y0 + 0.05 * h], fill=255), colour * 0.6, person=False)
    elif kind == "pedestrian":  # another person's body from one side
        side = rng.choice([-1, 1])
        edge = cx + side * (0.5 - target) * 0.5 * W * rng.uniform(0.8, 1.4)
        x0, x1 = (edge, W + 1) if side > 0 else (-1, edge)
        canvas.fill(lambda d: d.rectangle([x0, top + 0.1 * h, x1, top + h + 5], fill=255), colour, person=False)
        canvas.fill(lambda d: d.ellipse([(x0 + x1) / 2 - 0.1 * W, top - 0.02 * h, (x0 + x1) / 2 + 0.1 * W,
                                         top + 0.12 * h], fill=255), _colour(rng), person=False)
    else:  # a box, sign or bin in front of the middle of the body
        side_len = math.sqrt(target) * 0.9
        bw, bh = side_len * W * rng.uniform(0.9, 1.3), side_len * h * rng.uniform(0.9, 1.2)
        x0 = cx - bw / 2 + rng.uniform(-0.15, 0.15) * W
        y0 = top + h * rng.uniform(0.25, 0.95) - bh / 2
        canvas.fill(lambda d: d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=255), colour, person=False)
    person_after = np.asarray(canvas.mask, dtype=bool).sum()
    return 1.0 - person_after / max(person_before, 1)


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
    rng = _rng(config, _IMAGE, *image_key)
    camera = make_camera(config, camera_index)
    H, W = config.height * SUPERSAMPLE, config.width * SUPERSAMPLE
    canvas = _Canvas(H, W, _background(rng, camera, H, W))
    box = _draw_person(canvas, identity, rng)
    occluded = 0.0
    if occlude:
        occ_rng = _rng(config, _OCCLUDER, *image_key)
        # Re-draw until the hidden fraction lands in the configured band (a few tries at most).
        base_image, base_mask = canvas.image.copy(), canvas.mask.copy()
        for _ in range(12):
            canvas.image, canvas.mask = base_image.copy(), base_mask.copy()
            occluded = _draw_occluder(canvas, occ_rng, box, config)
            if config.occlusion_min <= occluded <= config.occlusion_max:
                break
    image = _apply_camera(canvas.image, camera, rng)
    return image.resize((config.width, config.height), Image.Resampling.LANCZOS), occluded


def _camera_schedule(rng: np.random.Generator, config: SynthConfig) -> list[int]:
    """Cameras (0-based) for one identity's images: 2..num_cameras cameras, >= 2 images each."""
    count = int(rng.integers(2, config.num_cameras + 1))
    cameras = sorted(rng.choice(config.num_cameras, size=count, replace=False).tolist())
    return [cameras[i % count] for i in range(config.images_per_id)]


def _file_name(pid: int, camera: int, frame: int, index: int) -> str:
    pid_text = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_text}_c{camera + 1}s1_{frame:06d}_{index:02d}.jpg"


def generate(out: str | Path, config: SynthConfig = SynthConfig(),
             progress: Callable[[str], None] | None = None) -> dict:
    """Write the data set under `out` (Market-1501 layout + query_occluded/); return its manifest.

    Writes into a temporary sibling folder and renames it at the end, so an interrupted run
    never leaves a half-written data set that looks complete.
    """
    out = Path(out)
    if (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} already holds a synthetic data set; remove it or choose another --out")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    # A private temporary folder per process: two runs racing for the same cache both finish.
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folders = {name: tmp / name for name in ("bounding_box_train", "bounding_box_test", "query", "query_occluded")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    counts = {name: 0 for name in folders}
    occlusion: list[float] = []
    frame = 0

    def save(folder: str, image: Image.Image, pid: int, camera: int, same_frame: bool = False) -> None:
        """Write one image; `same_frame` reuses the previous frame number (an occluded twin)."""
        nonlocal frame
        frame += 0 if same_frame else 1
        image.save(folders[folder] / _file_name(pid, camera, frame, 1), quality=JPEG_QUALITY)
        counts[folder] += 1

    total_ids = config.train_ids + config.test_ids
    for pid in range(1, total_ids + 1):
        if progress and (pid == 1 or pid % 50 == 0):
            progress(f"identity {pid}/{total_ids}")
        identity = make_identity(config, pid)
        split_rng = _rng(config, _SPLIT, pid)
        cameras = _camera_schedule(split_rng, config)
        is_train = pid <= config.train_ids
        query_images = set()
        if not is_train:  # first image of up to queries_per_id distinct cameras
            first_seen: dict[int, int] = {}
            for index, camera in enumerate(cameras):
                first_seen.setdefault(camera, index)
            chosen = split_rng.permutation(sorted(first_seen))[: config.queries_per_id]
            query_images = {first_seen[int(c)] for c in chosen}
        for index, camera in enumerate(cameras):
            key = (pid, index)
            if is_train:
                occlude = split_rng.random() < config.train_occluded_fraction
                image, _ = render(config, identity, camera, key, occlude=occlude)
                save("bounding_box_train", image, pid, camera)
            elif index in query_images:
                save("query", render(config, identity, camera, key)[0], pid, camera)
                image, hidden = render(config, identity, camera, key, occlude=True)
                occlusion.append(hidden)
                save("query_occluded", image, pid, camera, same_frame=True)
            else:
                save("bounding_box_test", render(config, identity, camera, key)[0], pid, camera)
    extra_rng = _rng(config, _EXTRA)
    for index in range(config.distractors):  # people never queried: pid 0
        identity = make_identity(config, total_ids + 1 + index)
        camera = int(extra_rng.integers(config.num_cameras))
        save("bounding_box_test", render(config, identity, camera, (total_ids + 1 + index, 0))[0], 0, camera)
    for index in range(config.junk):  # bad detections: a sliver of a person, mostly background
        identity = make_identity(config, total_ids + 1 + config.distractors + index)
        camera = int(extra_rng.integers(config.num_cameras))
        image, _ = render(config, identity, camera, (total_ids + 1 + config.distractors + index, 0))
        width = image.width
        cut = int(width * extra_rng.uniform(0.6, 0.85))
        shifted = Image.new("RGB", image.size, tuple(int(c) for c in make_camera(config, camera).background))
        shifted.paste(image.crop((0, 0, width - cut, image.height)), (cut, 0))
        save("bounding_box_test", shifted, -1, camera)

    manifest = {
        "generator": "amg.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "counts": counts,
        "occluded_fraction": {
            "mean": float(np.mean(occlusion)) if occlusion else 0.0,
            "min": float(np.min(occlusion)) if occlusion else 0.0,
            "max": float(np.max(occlusion)) if occlusion else 0.0,
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if (out / MANIFEST).is_file():  # another process finished the same data set first
        shutil.rmtree(tmp)
        return manifest
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    if progress:
        progress(f"wrote {sum(counts.values())} images to {out}: {counts}")
    return manifest
