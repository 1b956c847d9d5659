"""A deterministic synthetic person Re-ID data set in the Market-1501 file layout.

Each identity's images come from 2..num_cameras cameras (`amg.data.synthetic_render` draws
them). The first `train_ids` identities form `bounding_box_train/`, some of their images
occluded, as in Occluded-Duke; of the rest, the first image from up to `queries_per_id`
cameras is a query and the others are gallery. The holistic query split is `query/`; the same
query images with an occluder covering 20-60% of the body form `query_occluded/`. Pid 0 marks
distractors and -1 junk crops in the gallery, as in Market-1501.

Everything is drawn from `numpy.random.default_rng((seed, stream, ...))`, so the same
config gives byte-identical files on any machine with the same Pillow.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
from PIL import Image

from amg.data.synthetic_render import (
    STREAM_EXTRA,
    STREAM_SPLIT,
    Identity,
    make_identity,
    render,
    render_junk,
    stream_rng,
)
from amg.errors import InputError

# Bump whenever a change here or in amg.data.synthetic_render / _canvas / _occluders changes
# the images, so cached data sets are regenerated.
GENERATOR_VERSION = 3
JPEG_QUALITY = 92
MANIFEST = "synthetic.json"
_FOLDERS = ("bounding_box_train", "bounding_box_test", "query", "query_occluded")


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
        if self.seed < 0:
            raise InputError(f"the seed must be >= 0 (NumPy's generators take no negative seed), got {self.seed}")


def _file_name(pid: int, camera: int, frame: int, index: int) -> str:
    pid_text = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_text}_c{camera + 1}s1_{frame:06d}_{index:02d}.jpg"


class _Writer:
    """Saves images into the layout's folders under `root`, numbering frames in writing order."""

    def __init__(self, root: Path) -> None:
        self.folders = {name: root / name for name in _FOLDERS}
        for folder in self.folders.values():
            folder.mkdir(parents=True)
        self.counts = dict.fromkeys(self.folders, 0)
        self.occlusion: list[float] = []  # the hidden fraction of each occluded query
        self._frame = 0

    def save(self, folder: str, image: Image.Image, pid: int, camera: int, same_frame: bool = False) -> None:
        """Write one image; `same_frame` reuses the previous frame number (an occluded twin)."""
        self._frame += 0 if same_frame else 1
        image.save(self.folders[folder] / _file_name(pid, camera, self._frame, 1), quality=JPEG_QUALITY)
        self.counts[folder] += 1


def _camera_schedule(rng: np.random.Generator, config: SynthConfig) -> list[int]:
    """Cameras (0-based) for one identity's images: 2..num_cameras cameras, >= 2 images each."""
    count = int(rng.integers(2, config.num_cameras + 1))
    cameras = sorted(rng.choice(config.num_cameras, size=count, replace=False).tolist())
    return [cameras[i % count] for i in range(config.images_per_id)]


def _query_indices(rng: np.random.Generator, cameras: list[int], config: SynthConfig) -> set[int]:
    """Which of a test identity's images are queries: the first image of up to queries_per_id cameras."""
    first_seen: dict[int, int] = {}
    for index, camera in enumerate(cameras):
        first_seen.setdefault(camera, index)
    chosen = rng.permutation(sorted(first_seen))[: config.queries_per_id]
    return {first_seen[int(c)] for c in chosen}


def _write_train_identity(writer: _Writer, config: SynthConfig, identity: Identity, pid: int,
                          cameras: list[int], split_rng: np.random.Generator) -> None:
    for index, camera in enumerate(cameras):
        occlude = split_rng.random() < config.train_occluded_fraction
        image, _ = render(config, identity, camera, (pid, index), occlude=occlude)
        writer.save("bounding_box_train", image, pid, camera)


def _write_test_identity(writer: _Writer, config: SynthConfig, identity: Identity, pid: int,
                         cameras: list[int], split_rng: np.random.Generator) -> None:
    """Queries (each with its occluded twin) and the gallery images of one test identity."""
    queries = _query_indices(split_rng, cameras, config)
    for index, camera in enumerate(cameras):
        key = (pid, index)
        holistic, _ = render(config, identity, camera, key)
        if index in queries:
            writer.save("query", holistic, pid, camera)
            occluded, hidden = render(config, identity, camera, key, occlude=True)
            writer.occlusion.append(hidden)
            writer.save("query_occluded", occluded, pid, camera, same_frame=True)
        else:
            writer.save("bounding_box_test", holistic, pid, camera)


def _write_identity(writer: _Writer, config: SynthConfig, pid: int) -> None:
    identity = make_identity(config, pid)
    split_rng = stream_rng(config, STREAM_SPLIT, pid)
    cameras = _camera_schedule(split_rng, config)
    write = _write_train_identity if pid <= config.train_ids else _write_test_identity
    write(writer, config, identity, pid, cameras, split_rng)


def _write_distractors(writer: _Writer, config: SynthConfig, extra_rng: np.random.Generator) -> None:
    """Pid 0 gallery images: people outside the test set, never queried."""
    first = config.train_ids + config.test_ids + 1  # the people after all identities
    for person in range(first, first + config.distractors):
        camera = int(extra_rng.integers(config.num_cameras))
        image, _ = render(config, make_identity(config, person), camera, (person, 0))
        writer.save("bounding_box_test", image, 0, camera)


def _write_junk(writer: _Writer, config: SynthConfig, extra_rng: np.random.Generator) -> None:
    """Pid -1 gallery images: bad detections, a sliver of a person, mostly background."""
    first = config.train_ids + config.test_ids + config.distractors + 1  # the people after the distractors
    for person in range(first, first + config.junk):
        camera = int(extra_rng.integers(config.num_cameras))
        cut = extra_rng.uniform(0.6, 0.85)
        image = render_junk(config, make_identity(config, person), camera, (person, 0), cut)
        writer.save("bounding_box_test", image, -1, camera)


def _manifest(config: SynthConfig, writer: _Writer) -> dict:
    occlusion = writer.occlusion
    return {
        "generator": "amg.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "counts": writer.counts,
        "occluded_fraction": {
            "mean": float(np.mean(occlusion)) if occlusion else 0.0,
            "min": float(np.min(occlusion)) if occlusion else 0.0,
            "max": float(np.max(occlusion)) if occlusion else 0.0,
        },
    }


def _refuse_existing(out: Path) -> None:
    if (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} already holds a synthetic data set; remove it or choose another --out")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")


def _remove_abandoned_partials(out: Path) -> None:
    """Delete `<out>.partial-<pid>` folders of generators that were killed (their process is gone);
    a running generator's folder is left alone."""
    for partial in out.parent.glob(f"{out.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> bool:
    """Rename the finished `tmp` to `out`; False (and `tmp` removed) if another process got there first."""
    if (out / MANIFEST).is_file():  # another process finished the same data set first
        shutil.rmtree(tmp)
        return False
    if out.exists():  # empty, or _refuse_existing would have stopped the run
        out.rmdir()
    os.replace(tmp, out)
    return True


def generate(out: str | Path, config: SynthConfig = SynthConfig(),
             progress: Callable[[str], None] | None = None) -> dict:
    """Write the data set under `out` (Market-1501 layout + query_occluded/); return its manifest.

    Writes into a temporary sibling folder and renames it at the end, so an interrupted run
    never leaves a half-written data set that looks complete.
    """
    out = Path(out)
    _refuse_existing(out)
    # A private temporary folder per process: two runs racing for the same cache both finish.
    _remove_abandoned_partials(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = _Writer(tmp)
    total_ids = config.train_ids + config.test_ids
    for pid in range(1, total_ids + 1):
        if progress and (pid == 1 or pid % 50 == 0):
            progress(f"identity {pid}/{total_ids}")
        _write_identity(writer, config, pid)
    # Distractors, then junk, from one stream: their cameras and cuts never move the identities'.
    extra_rng = stream_rng(config, STREAM_EXTRA)
    _write_distractors(writer, config, extra_rng)
    _write_junk(writer, config, extra_rng)
    manifest = _manifest(config, writer)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if _publish(tmp, out) and progress:
        progress(f"wrote {sum(writer.counts.values())} images to {out}: {writer.counts}")
    return manifest
