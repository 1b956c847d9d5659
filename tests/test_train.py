"""A short real training run, its determinism, the losses, and the default-model cache."""

from __future__ import annotations

import pytest
import torch

import amg.train.cache as model_cache
from amg.data.layout import load_dataset
from amg.data.synthetic import SynthConfig, generate
from amg.errors import InputError
from amg.model.vit import load_model
from amg.train.config import TrainConfig
from amg.train.losses import batch_hard_triplet
from amg.train.reid_training import learning_rate

TINY_DATA = SynthConfig(train_ids=8, test_ids=4, images_per_id=6, num_cameras=3, queries_per_id=2,
                        distractors=2, junk=1, height=64, width=32, seed=3)
SHORT = TrainConfig(steps=24, num_identities=4, num_instances=2, warmup_steps=4, lr=1e-3, log_every=8)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "synth"
    generate(root, TINY_DATA)
    return root


def test_short_training_run_lowers_the_loss_and_is_reproducible(tiny_root):
    dataset = load_dataset(tiny_root)
    model_a, summary = model_cache.train_on_dataset("small", dataset, SHORT, img_size=(64, 32))
    model_b, _ = model_cache.train_on_dataset("small", dataset, SHORT, img_size=(64, 32))
    assert summary["steps"] == SHORT.steps
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    assert summary["final_loss"] < summary["first_loss"]
    assert not model_a.training  # handed back in eval mode


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_fraction=0.01)
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(0.01, abs=1e-3)


def test_batch_hard_triplet_hand_case():
    # ids 0,0,1,1 on a line at 0, 1, 3, 6: anchor 0 -> hardest pos 1, hardest neg 3: 1 - 3 + 0.3 < 0 -> 0
    # anchor 1 -> pos 1, neg 2: -0.7 -> 0; anchor 3 -> pos 3, neg 2: 3 - 2 + .3 = 1.3
    # anchor 6 -> pos 3, neg 5: 0 ; mean = 1.3 / 4
    features = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    loss = batch_hard_triplet(features, torch.tensor([0, 0, 1, 1]), margin=0.3)
    assert loss.item() == pytest.approx(1.3 / 4, abs=1e-5)
    with pytest.raises(ValueError, match="two identities"):
        batch_hard_triplet(features, torch.zeros(4, dtype=torch.long))


def test_a_diverging_training_says_so_and_names_the_learning_rate(tiny_root):
    """A learning rate of 1e30 turns the weights to NaN: the error must say the training diverged,
    not that a batch lacks two identities (what NaN distances looked like before)."""
    diverging = TrainConfig(steps=6, num_identities=4, num_instances=2, warmup_steps=1, lr=1e30, log_every=2)
    with pytest.raises(InputError, match=r"(training diverged|not finite).*lower the learning rate"):
        model_cache.train_on_dataset("small", load_dataset(tiny_root), diverging, img_size=(64, 32))
    with pytest.raises(InputError, match="training diverged"):
        batch_hard_triplet(torch.tensor([[0.0], [float("nan")]]), torch.tensor([0, 1]))


def test_default_model_is_trained_once_then_loaded(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AMG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(model_cache, "synthetic_root", lambda config, progress=None: tiny_root)
    model, path = model_cache.default_model("small", TINY_DATA, SHORT)
    assert path.is_file() and path.parent == tmp_path / "cache" / "models"

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(model_cache, "train_reid", must_not_train)
    again, same_path = model_cache.default_model("small", TINY_DATA, SHORT)
    assert same_path == path
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), again(images))
    # a different training config is a different cache entry
    assert model_cache.default_model_path("small", TINY_DATA, TrainConfig(steps=25)) != path
    assert load_model(path).config.img_size == (64, 32)


def test_an_interrupted_training_resumes_to_the_same_weights(tiny_trained, tmp_path):
    """Stopped after step 4 of 6 (checkpoints every 2 steps), then run again: the final weights
    equal an uninterrupted run's exactly, and the checkpoint is gone once training ends."""
    import copy

    from amg.data.layout import relabel_pids
    from amg.data.preload import preload_images
    from amg.model.vit import build_model
    from amg.train.reid_training import train_reid

    dataset, _ = tiny_trained
    labels, _ = relabel_pids(dataset.train)
    camids = [s.camid for s in dataset.train]
    images = preload_images(dataset.train, (64, 32))
    config = TrainConfig(steps=6, num_identities=3, num_instances=2, warmup_steps=2, log_every=1)
    torch.manual_seed(0)
    start = build_model("small", num_classes=max(labels) + 1, img_size=(64, 32))

    straight = copy.deepcopy(start)
    train_reid(straight, images, labels, camids, config)

    class Stop(Exception):
        pass

    def stop_after_step_4(message: str) -> None:
        if message.startswith("step 4/6"):
            raise Stop

    checkpoint = tmp_path / "model.pt.resume"
    resumed = copy.deepcopy(start)
    with pytest.raises(Stop):
        train_reid(resumed, images, labels, camids, config, stop_after_step_4, checkpoint=checkpoint,
                   checkpoint_every=2)
    assert checkpoint.is_file()
    messages = []
    resumed = copy.deepcopy(start)  # a new process would start from fresh weights too
    log = train_reid(resumed, images, labels, camids, config, messages.append, checkpoint=checkpoint,
                     checkpoint_every=2)
    assert messages[0] == f"resuming from {checkpoint} at step 4/6" and len(log.losses) == 6
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert not checkpoint.exists()
    other = TrainConfig(steps=7, num_identities=3, num_instances=2, warmup_steps=2, log_every=1)
    with pytest.raises(Stop):
        train_reid(copy.deepcopy(start), images, labels, camids, config, stop_after_step_4, checkpoint=checkpoint,
                   checkpoint_every=2)
    with pytest.raises(ValueError, match="was made with other settings"):
        train_reid(copy.deepcopy(start), images, labels, camids, other, checkpoint=checkpoint)
