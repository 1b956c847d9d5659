"""The embedded default: a synthetic data set and a small model trained on it, both cached.

Cache keys hash every setting that changes the result (data config, model config, training
config, recipe version), so changing any of them trains anew instead of reusing stale weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from amg.data.layout import ReIDDataset, load_dataset, relabel_pids
from amg.data.preload import preload_images
from amg.data.synthetic import GENERATOR_VERSION, MANIFEST, SynthConfig, generate
from amg.model.config import DEFAULT_PRESET, get_config
from amg.model.vit import ReIDViT, build_model, load_model, save_model
from amg.train.config import TrainConfig
from amg.train.reid_training import train_reid

# Bump when the training code changes in a way the configs do not capture.
RECIPE_VERSION = 1

Progress = Callable[[str], None]


def cache_root() -> Path:
    """`$AMG_CACHE_DIR`, else `~/.cache/amg-bench`."""
    return Path(os.environ.get("AMG_CACHE_DIR") or Path.home() / ".cache" / "amg-bench")


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def synthetic_root(config: SynthConfig = SynthConfig(), progress: Progress | None = None) -> Path:
    """Path of the cached synthetic data set for `config`, generating it on first use."""
    root = cache_root() / "data" / f"synth-{_key({'synth': config.__dict__, 'version': GENERATOR_VERSION})}"
    if not (root / MANIFEST).is_file():
        if progress:
            progress(f"generating the synthetic Re-ID data set in {root} (once; about a minute)")
        generate(root, config, progress)
    return root


def default_model_path(preset: str, synth: SynthConfig, training: TrainConfig) -> Path:
    model_config = get_config(preset, img_size=(synth.height, synth.width))
    key = _key({"model": model_config.to_dict(), "synth": synth.__dict__, "train": training.to_dict(),
                "recipe": RECIPE_VERSION, "data_version": GENERATOR_VERSION})
    return cache_root() / "models" / f"{preset}-synth-{key}.pt"


def train_on_dataset(preset: str, dataset: ReIDDataset, training: TrainConfig,
                     img_size: tuple[int, int] | None = None, progress: Progress | None = None,
                     checkpoint: Path | None = None, **overrides: Any) -> tuple[ReIDViT, dict[str, Any]]:
    """Train a fresh `preset` model on `dataset`'s training split; returns (model, summary).
    With `checkpoint`, training saves its state there as it goes and continues from it."""
    labels, _ = relabel_pids(dataset.train)
    camids = [sample.camid for sample in dataset.train]
    if img_size is not None:
        overrides["img_size"] = tuple(img_size)
    torch.manual_seed(training.seed)
    model = build_model(preset, num_classes=max(labels) + 1, **overrides)
    if progress:
        progress(f"loading {len(dataset.train)} training images")
    images = preload_images(dataset.train, model.config.img_size, progress)
    log = train_reid(model, images, labels, camids, training, progress, checkpoint=checkpoint)
    summary = {"train_seconds": round(log.seconds, 1), "steps": log.steps,
               "first_loss": log.losses[0], "final_loss": log.losses[-1], "final_id_accuracy": log.final_accuracy,
               "dataset": str(dataset.root), "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return model, summary


def default_model(preset: str = DEFAULT_PRESET, synth: SynthConfig = SynthConfig(),
                  training: TrainConfig = TrainConfig(),
                  progress: Progress | None = None) -> tuple[ReIDViT, Path]:
    """The cached model trained on the synthetic set: loaded if cached, else trained and cached."""
    path = default_model_path(preset, synth, training)
    if path.is_file():
        return load_model(path), path
    dataset = load_dataset(synthetic_root(synth, progress))
    if progress:
        progress(f"training the {preset!r} model on the synthetic set (cached as {path} afterwards)")
    # A killed first run continues where it stopped (the checkpoint sits beside the cached model).
    model, summary = train_on_dataset(preset, dataset, training, (synth.height, synth.width), progress,
                                      checkpoint=resume_path(path))
    save_model(model, path, **summary)
    return model, path


def resume_path(model_path: Path) -> Path:
    """Where training towards `model_path` keeps its checkpoint."""
    return model_path.with_name(model_path.name + ".resume")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's weights: what a cached derivative (a fine-tuned copy) is keyed on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def pruned_model_path(key: dict[str, Any], folder: Path | None = None) -> Path:
    """Where the pruned model of `key` is cached: a name made of its content (plan, schedule, base
    weights, data identity...), in `folder` (default: the cache's pruned/)."""
    return Path(folder or cache_root() / "pruned") / f"{_key({**key, 'recipe': RECIPE_VERSION})}.pt"


def cached_pruned(key: dict[str, Any], build: Callable[[Path], ReIDViT], progress: Progress | None = None,
                  folder: Path | None = None) -> ReIDViT:
    """The pruned model cached under `key` (plan, schedule, base weights...) in `folder`, built on
    first use by `build(checkpoint)`, which may keep its training state at `checkpoint` to resume
    after a kill. The file appears whole or not at all (`save_model` writes atomically)."""
    from amg.model.pruned import load_pruned, save_pruned

    path = pruned_model_path(key, folder)
    if path.is_file():
        if progress:
            progress(f"loading the cached pruned model {path.name}")
        return load_pruned(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(resume_path(path))
    save_pruned(model, path)
    return model
