"""Iterative prune -> fine-tune (distilled) -> re-score, and the distillation loss."""

from __future__ import annotations

import pytest
import torch

from amg.data.layout import load_dataset, relabel_pids
from amg.data.preload import preload_images
from amg.data.synthetic import SynthConfig, generate
from amg.errors import InputError
from amg.model.pruned import load_pruned, save_pruned
from amg.model.vit import build_model
from amg.pruning.calibration import CalibrationImages
from amg.pruning.iterative import IterativeConfig, TrainingSet, iterative_prune, run_schedule
from amg.pruning.planner import make_plan
from amg.pruning.schedule import Schedule
from amg.train.cache import train_on_dataset
from amg.train.config import TrainConfig
from amg.train.losses import soft_distillation

DATA = SynthConfig(train_ids=6, test_ids=3, images_per_id=6, num_cameras=3, queries_per_id=2,
                   distractors=1, junk=1, height=64, width=32, seed=11)
BASE = TrainConfig(steps=4, num_identities=3, num_instances=2, warmup_steps=1, log_every=4)


def test_soft_distillation_is_zero_for_equal_logits_and_grows_with_disagreement():
    logits = torch.randn(4, 5)
    assert soft_distillation(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_distillation(logits, logits.flip(1)).item() > 0.01
    with pytest.raises(ValueError, match="temperature"):
        soft_distillation(logits, logits, tau=0)


def test_iterative_pruning_reaches_the_ratio_and_leaves_the_original(tmp_path):
    root = tmp_path / "synth"
    generate(root, DATA)
    dataset = load_dataset(root)
    model, _ = train_on_dataset("small", dataset, BASE, img_size=(64, 32))
    labels, _ = relabel_pids(dataset.train)
    images = preload_images(dataset.train, (64, 32))
    camids = [s.camid for s in dataset.train]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, plan = iterative_prune(
        model, heads=0.5, tokens=0.25, calibration=CalibrationImages(images[:12], labels[:12], camids[:12]),
        training=TrainingSet(images, labels, camids), config=IterativeConfig(rounds=2, finetune_steps=2),
        base=BASE, progress=None, mlp=0.3)
    total = model.config.depth * model.config.num_heads
    assert plan.heads_kept == total - round(0.5 * total)
    hidden = model.config.depth * model.config.mlp_hidden  # MLP channels go last, scored on the pruned model
    assert sum(plan.mlp_widths(model.config)) == hidden - round(0.3 * hidden)
    assert plan.policy["mlp"] == "taylor" and plan.ratios["mlp"] == 0.3
    # every block with heads keeps the class token's K/V; an emptied block has none to keep
    assert all((tokens is not None and 0 in tokens) if heads else tokens is None
               for heads, tokens in zip(plan.kept_heads, plan.kept_tokens))
    assert plan.policy["schedule"].startswith("iterative x2")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    path = save_pruned(pruned, tmp_path / "iter.pt")
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(pruned(x), load_pruned(path)(x))


def test_a_peer_plan_is_not_pruned_iteratively():
    pytest.importorskip("torch_pruning")
    model = build_model("small", img_size=(64, 32)).eval()
    plan = make_plan(model, heads=0.25, mlp=0.25, head_policy="tp-magnitude", mlp_policy="tp-magnitude")
    training = TrainingSet(torch.zeros(2, 3, 64, 32, dtype=torch.uint8), [0, 1], [0, 0])
    with pytest.raises(InputError, match="finetune schedule"):
        run_schedule(model, plan, Schedule("iterative", 4, rounds=2), None, training)
