"""Options and shared fixtures of the benchmark suite (`pytest bench/`).

The suite is a thin layer: the model, data and measurements all come from `amg`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import pytest
import torch

from amg.model import DEFAULT_PRESET, PRESETS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("amg", "AMG-Bench")
    group.addoption("--amg-model", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                    help="model preset; the default one is trained on the synthetic set and cached, "
                         "others are timed with random weights unless --amg-checkpoint is given")
    group.addoption("--amg-checkpoint", default=None, help="an amg model file to benchmark instead")
    group.addoption("--amg-data", default=None, help="real data set root for accuracy (default: synthetic)")
    group.addoption("--amg-latency-model", default="vit_small", choices=sorted(PRESETS),
                    help="preset timed pruned vs unpruned in test_pruned_latency (random weights; "
                         "default %(default)s at 256x128, the size the pruning targets are stated at)")
    group.addoption("--amg-threads", type=int, default=None,
                    help="torch CPU threads (default: all cores); recorded with every latency")


def _progress_printer(config: pytest.Config) -> Callable[[str], None]:
    """Print past pytest's output capture: first-run data generation and training take minutes."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def progress(message: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n[amg] {message}", end="", flush=True)

    return progress


@pytest.fixture(scope="session")
def amg_threads(request: pytest.FixtureRequest) -> int:
    threads = request.config.getoption("--amg-threads")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@pytest.fixture(scope="session")
def reid_model(request: pytest.FixtureRequest):
    """(model, trained): the checkpoint, the cached default model, or an untrained preset."""
    from amg.model import build_model, load_model
    from amg.zoo import default_model

    checkpoint = request.config.getoption("--amg-checkpoint")
    preset = request.config.getoption("--amg-model")
    if checkpoint:
        return load_model(checkpoint).eval(), True
    if preset == DEFAULT_PRESET:
        return default_model(preset, progress=_progress_printer(request.config))[0].eval(), True
    torch.manual_seed(0)
    return build_model(preset).eval(), False


@pytest.fixture(scope="session")
def evaluator(request: pytest.FixtureRequest, reid_model):
    from amg.data.layout import load_dataset
    from amg.evaluate import Evaluator
    from amg.zoo import synthetic_root

    model, trained = reid_model
    if not trained:
        pytest.skip("accuracy needs trained weights: this preset is untrained, pass --amg-checkpoint")
    progress = _progress_printer(request.config)
    root = request.config.getoption("--amg-data") or synthetic_root(progress=progress)
    return Evaluator(load_dataset(root), model.config.img_size, progress)
