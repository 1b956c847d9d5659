"""On-disk layouts of the person re-ID benchmarks, parsed into plain sample lists.

Supported releases (checked against torchreid and TransReID loaders):

* Market-1501     ``bounding_box_train/ query/ bounding_box_test/``, names ``0002_c1s1_000451_03.jpg``
* DukeMTMC-reID   same folders, names ``0005_c2_f0046985.jpg``
* Occluded-Duke   same folders and names as DukeMTMC-reID (release folder ``Occluded_Duke/``)
* MSMT17          ``train/ test/`` (V1) or ``mask_train_v2/ mask_test_v2/`` (V2) image trees plus
                  ``list_{train,val,query,gallery}.txt``; or already converted to the Market folders.

Unlike torchreid we never drop junk (-1) or distractor (0) images: evaluation code decides what
to do with them, and the loader only reports what is on disk. Every problem with the data raises
``DatasetError`` naming the file or folder, because a silently shrunken split corrupts results.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from amg.errors import InputError

LAYOUTS = ("market1501", "dukemtmc", "occluded_duke", "msmt17")

# Files with these suffixes must parse; anything else (Thumbs.db, readme.txt, .mat) is skipped.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
_EXT = r"\.(?i:jpe?g|png|bmp)"

# Folder-layout split folders (Market naming, reused by Duke, Occluded-Duke and converted MSMT17).
TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "bounding_box_train", "query", "bounding_box_test"
_MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
_DATA_DIR_MARKERS = (TRAIN_DIR, QUERY_DIR, GALLERY_DIR) + _MSMT_LISTS

# Original MSMT17 file name: pid_index_camera_dateTime_frame_n, e.g. 0000_000_01_0303morning_0015_0.jpg
_MSMT_NAME = re.compile(r"(?P<pid>\d+)_\d+_(?P<cam>\d+)_[0-9A-Za-z]+_\d+_\d+" + _EXT)
_MSMT_NAME_DOC = "PPPP_III_CC_<date><time>_FFFF_N.jpg (e.g. 0000_000_01_0303morning_0015_0.jpg)"


class DatasetError(InputError):
    """A dataset on disk does not look like it should; the message names the file or folder."""


@dataclass(frozen=True)
class Sample:
    path: Path
    pid: int  # as in the file name: -1 junk, 0 distractor (Market), >0 identities
    camid: int  # 0-based camera index


@dataclass(frozen=True)
class _Layout:
    name: str
    release_dirs: tuple[str, ...]  # folders the official archive extracts to, tried inside root
    num_cams: int
    name_res: tuple[re.Pattern[str], ...]  # file-name grammars with groups "pid" and "cam" (1-based)
    name_doc: str  # shown in "malformed file name" errors


_MARKET = re.compile(r"(?P<pid>-1|\d+)_c(?P<cam>\d)s\d+_\d+_\d+" + _EXT)
_DUKE = re.compile(r"(?P<pid>-1|\d+)_c(?P<cam>\d)_f\d+" + _EXT)
# Converted MSMT17 copies keep the original names or rename to Market style with 2-digit cameras.
_MSMT_MARKET_STYLE = re.compile(r"(?P<pid>-1|\d+)_c(?P<cam>\d+)(?:s\d+)?_\w+" + _EXT)

_SPECS: dict[str, _Layout] = {
    "market1501": _Layout("market1501", ("Market-1501-v15.09.15",), 6, (_MARKET,),
                          "PPPP_cCsS_FFFFFF_NN.jpg (e.g. 0002_c1s1_000451_03.jpg)"),
    "dukemtmc": _Layout("dukemtmc", ("DukeMTMC-reID",), 8, (_DUKE,),
                        "PPPP_cC_fFFFFFFF.jpg (e.g. 0005_c2_f0046985.jpg)"),
    "occluded_duke": _Layout("occluded_duke", ("Occluded_Duke",), 8, (_DUKE,),
                             "PPPP_cC_fFFFFFFF.jpg (e.g. 0005_c2_f0046985.jpg)"),
    "msmt17": _Layout("msmt17", ("MSMT17_V1", "MSMT17_V2", "MSMT17"), 15,
                      (_MSMT_NAME, _MSMT_MARKET_STYLE),
                      f"{_MSMT_NAME_DOC} or PPPP_cCC_*.jpg (e.g. 0000_c14_0001.jpg)"),
}

_ALL_RELEASE_DIRS = tuple(d for spec in _SPECS.values() for d in spec.release_dirs)


@dataclass(frozen=True)
class ReIDDataset:
    name: str  # one of LAYOUTS
    root: Path  # folder holding the split folders / list files
    train: list[Sample]
    gallery: list[Sample]
    query_sets: dict[str, list[Sample]]  # "query" plus one set per extra query_<name>/ folder

    @property
    def num_train_pids(self) -> int:
        # Junk is excluded because it never becomes a classifier label (see relabel_pids).
        return len({s.pid for s in self.train if s.pid != -1})

    @property
    def num_cameras(self) -> int:
        """Camera count of the benchmark (not just those seen), e.g. for camera embeddings."""
        return _SPECS[self.name].num_cams

    @cached_property
    def identity(self) -> str:
        """What the data set is, wherever it lies: its layout and a hash of every split's files
        (paths relative to the root, and sizes). Cached results are keyed on it, so that a
        cluster node or a device with the same files under another folder finds them. Computed
        once per loaded data set (it reads the size of every file: 126k of them for MSMT17)."""
        digest = hashlib.sha256()
        splits = [("train", self.train), ("gallery", self.gallery), *sorted(self.query_sets.items())]
        for split, samples in splits:
            digest.update(f"[{split}]".encode())
            for sample in samples:
                relative = sample.path.relative_to(self.root) if sample.path.is_relative_to(self.root) else sample.path
                digest.update(f"{relative.as_posix()}:{sample.pid}:{sample.camid}:{sample.path.stat().st_size}\n"
                              .encode())
        return f"{self.name}-{digest.hexdigest()[:16]}"

    def summary(self) -> str:
        rows = [("train", self.train)]
        rows += [(k if k == "query" else f"query_{k}", v) for k, v in self.query_sets.items()]
        rows.append(("gallery", self.gallery))
        width = max(len("split"), *(len(r[0]) for r in rows))
        lines = [f"{self.name} ({self.root})", f"{'split':<{width}}  {'images':>7}  {'identities':>10}  {'cameras':>7}"]
        for split, samples in rows:
            ids = len({s.pid for s in samples if s.pid != -1})
            cams = len({s.camid for s in samples})
            lines.append(f"{split:<{width}}  {len(samples):>7}  {ids:>10}  {cams:>7}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- locating the data


def _is_data_dir(folder: Path) -> bool:
    return any((folder / m).exists() for m in _DATA_DIR_MARKERS)


def _is_image_file(path: Path) -> bool:
    # Dot-files are OS metadata (macOS "._x.jpg" AppleDouble files, .DS_Store), never images.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _layout_from_folder_name(folder: Path) -> str | None:
    for spec in _SPECS.values():
        if folder.name in spec.release_dirs:
            return spec.name
    # Looser hints for renamed copies such as data/market1501 or data/occluded_duke.
    low = folder.name.lower()
    if "duke" in low:
        return "occluded_duke" if "occ" in low else "dukemtmc"
    if "msmt" in low:
        return "msmt17"
    if "market" in low:
        return "market1501"
    return None


def _layout_from_file_names(data_dir: Path) -> str | None:
    """Guess from one image name (the full parse validates the rest); None when it tells nothing."""
    for split in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        folder = data_dir / split
        if not folder.is_dir():
            continue
        first = next((p for p in sorted(folder.iterdir()) if _is_image_file(p)), None)
        if first is None:
            continue
        for name, pattern in (("market1501", _MARKET), ("dukemtmc", _DUKE), ("msmt17", _MSMT_NAME)):
            if pattern.fullmatch(first.name):
                return name
        return None
    return None


def _family(name: str) -> str:
    # Duke and Occluded-Duke share one file grammar, so names can only tell the family apart.
    return "duke" if name in ("dukemtmc", "occluded_duke") else name


def _locate(root: Path, layout: str) -> tuple[str, Path]:
    """Return (layout name, folder holding the splits) for a user-given root."""
    if layout != "auto" and layout not in _SPECS:
        raise DatasetError(f"unknown layout {layout!r} for {root}: expected 'auto' or one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")

    if _is_data_dir(root):
        hinted = _layout_from_folder_name(root)
        sniffed = _layout_from_file_names(root)
        if layout == "auto":
            if (root / "list_train.txt").exists():
                return "msmt17", root
            # File names are the data itself, so they win over a renamed folder; the folder name
            # still decides within a family (Duke vs Occluded-Duke).
            agree = hinted is not None and (sniffed is None or _family(hinted) == _family(sniffed))
            detected = hinted if agree else sniffed
            if detected is None:
                raise DatasetError(
                    f"cannot tell the dataset layout of {root} from its folder or file names; "
                    f"pass layout= one of {', '.join(LAYOUTS)}"
                )
            return detected, root
        # An explicit layout must agree with what the folder says about itself. Only exact
        # release names count (renamed copies are the user's business), and they are the only
        # way to tell Duke from Occluded-Duke, which share a file grammar.
        if root.name in _ALL_RELEASE_DIRS and hinted != layout:
            raise DatasetError(f"layout {layout!r} does not match release folder {root} (looks like {hinted!r})")
        if sniffed is not None and _family(sniffed) != _family(layout):
            raise DatasetError(
                f"layout {layout!r} does not match the file names in {root} (they look like {sniffed!r})"
            )
        return layout, root

    # The root may hold the extracted release folder(s), as torchreid and TransReID expect.
    found = [(s.name, root / d) for s in _SPECS.values() for d in s.release_dirs if (root / d).is_dir()]
    if layout != "auto":
        found = [f for f in found if f[0] == layout]
    names = sorted({name for name, _ in found})
    if len(names) == 1:
        return found[0]
    if len(names) > 1:
        dirs = ", ".join(str(d.name) for _, d in found)
        raise DatasetError(f"{root} holds several datasets ({dirs}); pass layout= one of {', '.join(names)}")
    want = _SPECS[layout].release_dirs if layout != "auto" else _ALL_RELEASE_DIRS
    raise DatasetError(
        f"no {'' if layout == 'auto' else layout + ' '}dataset in {root}: expected the split folders "
        f"{TRAIN_DIR}/, {QUERY_DIR}/, {GALLERY_DIR}/ (or MSMT17 list_train.txt) in it, "
        f"or one of the release folders {', '.join(want)}"
    )


# ----------------------------------------------------------------------------- parsing


def _sample(path: Path, pid: int, cam: int, spec: _Layout, where: str) -> Sample:
    if not 1 <= cam <= spec.num_cams:
        raise DatasetError(f"camera {cam} out of range 1..{spec.num_cams} for {spec.name}: {where}")
    return Sample(path=path, pid=pid, camid=cam - 1)


def _scan_folder(folder: Path, spec: _Layout) -> list[Sample]:
    samples = []
    for path in sorted(folder.iterdir()):  # sorted: listing order is file-system dependent
        if not _is_image_file(path):
            continue
        match = next((m for r in spec.name_res if (m := r.fullmatch(path.name))), None)
        if match is None:
            raise DatasetError(f"malformed file name {path}: expected {spec.name_doc}")
        samples.append(_sample(path, int(match["pid"]), int(match["cam"]), spec, str(path)))
    if not samples:
        raise DatasetError(f"split folder {folder} contains no images")
    return samples


def _load_folders(data_dir: Path, spec: _Layout) -> tuple[list[Sample], list[Sample], dict[str, list[Sample]]]:
    for split in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        if not (data_dir / split).is_dir():
            raise DatasetError(f"missing split folder {data_dir / split} ({spec.name} expects {split}/)")
    query_sets = {"query": _scan_folder(data_dir / QUERY_DIR, spec)}
    for extra in sorted(data_dir.glob("query_*")):
        if extra.is_dir():
            if extra.name == "query_":
                raise DatasetError(f"query set folder {extra} has no name after 'query_'")
            query_sets[extra.name[len("query_"):]] = _scan_folder(extra, spec)
    return _scan_folder(data_dir / TRAIN_DIR, spec), _scan_folder(data_dir / GALLERY_DIR, spec), query_sets


def _read_msmt_list(list_path: Path, image_dir: Path, spec: _Layout) -> list[Sample]:
    if not list_path.is_file():
        raise DatasetError(f"missing MSMT17 list file {list_path}")
    samples = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_path}:{lineno}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DatasetError(f"malformed line {where}: {line!r}, expected '<pid>/<file>.jpg <pid>'")
        match = _MSMT_NAME.fullmatch(Path(parts[0]).name)
        if match is None:
            raise DatasetError(f"malformed file name {parts[0]!r} at {where}: expected {_MSMT_NAME_DOC}")
        path = image_dir / parts[0]
        if not path.resolve().is_relative_to(image_dir.resolve()):
            raise DatasetError(f"{where}: {parts[0]!r} lies outside the image folder {image_dir}")
        if not path.is_file():
            raise DatasetError(f"{where} refers to missing file {path}")
        # The list's label is authoritative (as in torchreid); the camera comes from the name.
        samples.append(_sample(path, int(parts[1]), int(match["cam"]), spec, where))
    if not samples:
        raise DatasetError(f"MSMT17 list file {list_path} lists no images")
    return samples


def _load_msmt_lists(data_dir: Path) -> tuple[list[Sample], list[Sample], dict[str, list[Sample]]]:
    spec = _SPECS["msmt17"]
    dirs = {}
    for kind, names in (("train", ("train", "mask_train_v2")), ("test", ("test", "mask_test_v2"))):
        found = next((data_dir / n for n in names if (data_dir / n).is_dir()), None)
        if found is None:
            expected = f"expected {names[0]}/ (V1) or {names[1]}/ (V2)"
            raise DatasetError(f"missing MSMT17 image folder in {data_dir}: {expected}")
        dirs[kind] = found
    lists = {name: data_dir / name for name in _MSMT_LISTS}
    for path in lists.values():  # check all up front so a missing file is reported before parsing
        if not path.is_file():
            raise DatasetError(f"missing MSMT17 list file {path}")
    # train = list_train + list_val: the 32,621 training images of the paper (TransReID does this;
    # torchreid only with combineall=True).
    train = _read_msmt_list(lists["list_train.txt"], dirs["train"], spec)
    train += _read_msmt_list(lists["list_val.txt"], dirs["train"], spec)
    query = _read_msmt_list(lists["list_query.txt"], dirs["test"], spec)
    gallery = _read_msmt_list(lists["list_gallery.txt"], dirs["test"], spec)
    return train, gallery, {"query": query}


def load_dataset(root: str | Path, layout: str = "auto") -> ReIDDataset:
    """Parse a benchmark folder; ``layout`` is "auto" or one of ``LAYOUTS``."""
    name, data_dir = _locate(Path(root).expanduser(), layout)
    if name == "msmt17" and (data_dir / "list_train.txt").exists():
        train, gallery, query_sets = _load_msmt_lists(data_dir)
    else:
        train, gallery, query_sets = _load_folders(data_dir, _SPECS[name])
    return ReIDDataset(name=name, root=data_dir, train=train, gallery=gallery, query_sets=query_sets)


def relabel_pids(samples: list[Sample]) -> tuple[list[int], dict[int, int]]:
    """Contiguous classifier labels 0..K-1, assigned in sorted pid order so they are reproducible."""
    junk = next((s for s in samples if s.pid == -1), None)
    if junk is not None:
        raise DatasetError(f"junk image (pid -1) cannot get a training label: {junk.path}")
    pid2label = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    return [pid2label[s.pid] for s in samples], pid2label


# ----------------------------------------------------------------------------- images


def read_image(path: str | Path) -> Image.Image:
    """Decode fully now (PIL is lazy) so a corrupt file fails here, with its name, not in a transform."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err


class ReIDImageDataset(Dataset):
    """Map-style dataset yielding (image, label, camid, index); index lets evaluation map back to samples."""

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        labels: list[int] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(samples):
            raise InputError(f"got {len(labels)} labels for {len(samples)} samples")
        self.samples = list(samples)
        self.transform = transform
        self.labels = None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        sample = self.samples[index]
        label = sample.pid if self.labels is None else self.labels[index]
        return self.transform(read_image(sample.path)), label, sample.camid, index
