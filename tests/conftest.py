"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest

from amg.data.layout import load_dataset
from amg.data.synthetic import SynthConfig, generate
from amg.train.cache import train_on_dataset
from amg.train.config import TrainConfig

TINY_DATA = SynthConfig(train_ids=6, test_ids=3, images_per_id=6, num_cameras=3, queries_per_id=2,
                        distractors=1, junk=1, height=64, width=32, seed=5)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(dataset, model): a tiny synthetic set at 64x32 and the small preset trained 3 steps on it."""
    root = tmp_path_factory.mktemp("tiny") / "synth"
    generate(root, TINY_DATA)
    dataset = load_dataset(root)
    model, _ = train_on_dataset("small", dataset, TrainConfig(steps=3, num_identities=3, num_instances=2,
                                                              warmup_steps=1), img_size=(64, 32))
    return dataset, model
