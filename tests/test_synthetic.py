"""The synthetic generator: determinism, layout, occlusion band, bad configs."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from amg.data.layout import load_dataset
from amg.data.synthetic import MANIFEST, SynthConfig, generate

SMALL = SynthConfig(train_ids=4, test_ids=3, images_per_id=8, num_cameras=3, queries_per_id=2,
                    distractors=3, junk=2, seed=7)


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    generate(root, SMALL)
    return root


def test_same_seed_gives_identical_files(small_set, tmp_path):
    again = tmp_path / "again"
    generate(again, SMALL)
    assert digest(small_set) == digest(again)


def test_other_seed_gives_other_images(small_set, tmp_path):
    other = tmp_path / "other"
    generate(other, SynthConfig(**{**SMALL.__dict__, "seed": 8}))
    assert digest(small_set) != digest(other)


def test_market_reader_loads_it_with_both_query_sets(small_set):
    data = load_dataset(small_set)
    assert data.name == "market1501"
    assert set(data.query_sets) == {"query", "occluded"}
    assert data.num_train_pids == SMALL.train_ids
    assert len(data.train) == SMALL.train_ids * SMALL.images_per_id
    assert len(data.query_sets["query"]) == len(data.query_sets["occluded"]) == SMALL.test_ids * SMALL.queries_per_id
    gallery_pids = {s.pid for s in data.gallery}
    assert 0 in gallery_pids and -1 in gallery_pids  # distractors and junk, as in Market-1501
    # every query keeps a same-identity gallery image from another camera
    for q in data.query_sets["query"]:
        assert any(g.pid == q.pid and g.camid != q.camid for g in data.gallery)
    # the occluded query shows the same person, camera and frame as its holistic twin
    assert [(s.pid, s.camid, s.path.name) for s in data.query_sets["query"]] == \
        [(s.pid, s.camid, s.path.name) for s in data.query_sets["occluded"]]


def test_occlusion_within_band_and_visible(small_set):
    manifest = json.loads((small_set / MANIFEST).read_text())
    band = manifest["occluded_fraction"]
    assert SMALL.occlusion_min - 0.05 <= band["min"] and band["max"] <= SMALL.occlusion_max + 0.05
    data = load_dataset(small_set)
    for holistic, occluded in zip(data.query_sets["query"], data.query_sets["occluded"]):
        a = np.asarray(Image.open(holistic.path), dtype=float)
        b = np.asarray(Image.open(occluded.path), dtype=float)
        assert a.shape == (SMALL.height, SMALL.width, 3)
        assert np.abs(a - b).mean() > 5  # an occluder really was drawn


def test_refuses_to_overwrite(small_set):
    with pytest.raises(FileExistsError, match="already holds"):
        generate(small_set, SMALL)


@pytest.mark.parametrize("bad, message", [
    ({"num_cameras": 7}, "num_cameras"),
    ({"images_per_id": 3}, "images_per_id"),
    ({"train_ids": 1}, "identities"),
    ({"occlusion_min": 0.7}, "occlusion"),
])
def test_bad_config_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**{**SMALL.__dict__, **bad})


def test_a_killed_generators_partial_folder_is_removed_at_the_next_start(tmp_path):
    import subprocess
    import sys

    from amg.data.synthetic import generate

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"synth.partial-{int(finished.stdout)}"  # its process is gone: abandoned
    running = tmp_path / f"synth.partial-{os.getppid()}"  # a live process's: still being written
    for folder in (dead, running):
        (folder / "query").mkdir(parents=True)
    generate(tmp_path / "synth", SMALL)
    assert not dead.exists() and running.exists() and (tmp_path / "synth" / "synthetic.json").is_file()
