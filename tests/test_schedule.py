"""Schedules: one-shot, fine-tuned and iterative pruning from the same plan at the same step budget."""

from __future__ import annotations

import copy

import pytest
import torch

from amg.model.pruned import apply_plan
from amg.pruning.calibration import CalibrationImages
from amg.pruning.iterative import TrainingSet, run_schedule
from amg.pruning.planner import make_plan
from amg.pruning.schedule import ONE_SHOT, Schedule


@pytest.fixture(scope="module")
def trained(tiny_trained):
    dataset, model = tiny_trained
    calibration = CalibrationImages.from_dataset(dataset, (64, 32), count=12)
    return copy.deepcopy(model), calibration, TrainingSet.from_dataset(dataset, (64, 32))


def test_schedules_are_validated_and_labelled():
    assert ONE_SHOT.label == "one-shot"
    assert Schedule("finetune", 300).label == "ft300"
    assert Schedule("iterative", 300, rounds=3).label == "it3x300"
    assert "distilled" in Schedule("finetune", 300).description
    steps_rule, rounds_rule = "one-shot takes no fine-tuning steps", "rounds must be 1, or >= 1"
    for bad, message in ((dict(kind="anneal", steps=1), "unknown schedule 'anneal'"),
                         (dict(kind="one-shot", steps=5), steps_rule), (dict(kind="finetune", steps=0), steps_rule),
                         (dict(kind="finetune", steps=-5), steps_rule),
                         (dict(kind="finetune", steps=5, rounds=2), rounds_rule),
                         (dict(kind="iterative", steps=5, rounds=0), rounds_rule)):
        with pytest.raises(ValueError, match=message):
            Schedule(**bad)


def test_one_shot_is_the_plan_applied_and_fine_tuning_changes_only_the_copy(trained):
    model, calibration, training = trained
    plan = make_plan(model, heads=0.34, tokens=0.25, data=calibration)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 32)
    one_shot = run_schedule(model, plan, ONE_SHOT, calibration, training)
    reference = apply_plan(copy.deepcopy(model), plan)
    tuned = run_schedule(model, plan, Schedule("finetune", 2), calibration, training)
    with torch.no_grad():
        assert torch.equal(one_shot(x), reference(x))
        assert not torch.allclose(tuned(x), one_shot(x))
    assert tuned.plan.kept_heads == plan.kept_heads and tuned.plan.kept_tokens == plan.kept_tokens
    assert tuned.plan.policy["schedule"].startswith("one-shot + 2 fine-tune steps")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="needs training data"):
        run_schedule(model, plan, Schedule("finetune", 2), calibration, None)


def test_iterative_keeps_the_one_shot_ratios(trained):
    model, calibration, training = trained
    plan = make_plan(model, heads=0.5, tokens=0.25, data=calibration)
    pruned = run_schedule(model, plan, Schedule("iterative", 6, rounds=2), calibration, training)
    assert pruned.plan.heads_kept == plan.heads_kept  # same number of heads, maybe other ones
    assert pruned.plan.ratios == plan.ratios
    assert pruned.plan.policy["schedule"] == "iterative x2, 6 fine-tune steps in all, distilled"
    for result in (plan, pruned.plan):  # the token ratio of the blocks that still have heads
        candidates = (result.num_tokens - 1) * sum(1 for heads in result.kept_heads if heads)
        dropped = sum(result.num_tokens - len(t) for t in result.kept_tokens if t is not None)
        assert dropped == round(0.25 * candidates)


def test_a_fine_tuning_keeps_its_checkpoint_where_the_caller_says(trained, tmp_path, monkeypatch):
    """The suite caches fine-tunes; their training state goes beside the cache entry so that a
    killed study resumes (train_reid's resume itself is tested in test_train)."""
    import amg.pruning.iterative as iterative

    model, _, training = trained
    seen = []
    real = iterative.train_reid
    monkeypatch.setattr(iterative, "train_reid", lambda *args, **kwargs: seen.append(kwargs["checkpoint"])
                        or real(*args, **kwargs))
    plan = make_plan(model, heads=0.34, head_policy="random")
    run_schedule(model, plan, Schedule("finetune", 2), None, training, checkpoint=tmp_path / "entry.pt.resume")
    assert seen == [tmp_path / "entry.pt.resume"]
