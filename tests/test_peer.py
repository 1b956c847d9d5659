"""Torch-Pruning as a peer: its choice becomes a plan whose model equals the one Torch-Pruning
prunes itself, by the MACs target like every policy; configurations name it; missing, it is
said how to install it."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from amg.benchmark.profiles import PruneSpec
from amg.errors import InputError
from amg.measure.flops import count_macs
from amg.model.config import ModelConfig
from amg.model.pruned import apply_plan, load_pruned, save_pruned
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages
from amg.pruning.macs_target import plan_for_saving
from amg.pruning.peer import PeerUnavailable, make_pruner, peer_plan
from amg.pruning.planner import make_plan

pytest.importorskip("torch_pruning", reason="Torch-Pruning is the optional peer: pip install -e '.[peers]'")

CONFIGS = [
    ModelConfig("peer-test", img_size=(64, 32), embed_dim=48, depth=3, num_heads=4),
    ModelConfig("peer-test-sie", img_size=(64, 32), embed_dim=48, depth=2, num_heads=3, num_cameras=3,
                patch_stride=12, qkv_bias=False),
]


def _model(config: ModelConfig, num_classes: int = 0) -> ReIDViT:
    torch.manual_seed(0)
    return ReIDViT(config, num_classes=num_classes).eval()


def _inputs(model: ReIDViT):
    images = torch.randn(2, 3, *model.config.img_size, generator=torch.Generator().manual_seed(1))
    return images, (torch.tensor([0, 2]) if model.sie_embed is not None else None)


def _calibration(config: ModelConfig, classes: int = 4) -> CalibrationImages:
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (16, 3, *config.img_size), dtype=torch.uint8, generator=generator)
    return CalibrationImages(images, labels=[i % classes for i in range(16)], camids=[i % 3 for i in range(16)],
                             description={"images": 16}, batch_size=8)


def _pruned_by_torch_pruning(model: ReIDViT, heads: float, mlp: float, name: str) -> ReIDViT:
    """What Torch-Pruning's own pruning makes: physically pruned layers, timm's head count updated."""
    work = copy.deepcopy(model)
    make_pruner(work, heads, mlp, name).step()
    for block in work.backbone.blocks:
        attn = block.attn
        attn.num_heads = attn.qkv.out_features // (3 * attn.head_dim)
        attn.attn_dim = attn.num_heads * attn.head_dim
    return work


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_the_plan_is_the_model_torch_pruning_makes(config):
    model = _model(config)
    plan = peer_plan(model, 0.5, 0.5, "tp-magnitude")
    assert sum(map(len, plan.kept_heads)) < config.depth * config.num_heads
    assert plan.kept_mlp is not None and any(kept is not None for kept in plan.kept_mlp)
    ours = apply_plan(copy.deepcopy(model), plan)
    theirs = _pruned_by_torch_pruning(model, 0.5, 0.5, "tp-magnitude")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    with torch.no_grad():
        assert torch.allclose(ours(*_inputs(model)), theirs(*_inputs(model)), atol=1e-5)
    assert count_macs(ours).total < count_macs(model).total


def test_taylor_uses_the_calibration_gradients_and_is_repeatable():
    config = CONFIGS[0]
    model = _model(config, num_classes=4)
    data = _calibration(config)
    with pytest.raises(InputError, match="calibration data"):
        peer_plan(model, 0.5, 0.5, "tp-taylor")
    first = peer_plan(model, 0.5, 0.5, "tp-taylor", data)
    assert first.to_dict() == peer_plan(model, 0.5, 0.5, "tp-taylor", data).to_dict()
    assert first.kept_heads != peer_plan(model, 0.5, 0.5, "tp-magnitude").kept_heads
    assert first.policy == {"heads": "tp-taylor", "tokens": "none", "allocation": "global", "mlp": "tp-taylor"}
    assert first.calibration == {"images": 16}  # what it was scored on is recorded
    assert all(p.grad is None for p in model.parameters()), "scoring must not leave gradients on the model"


def test_a_macs_target_is_reached_and_the_plan_travels(tmp_path):
    config = CONFIGS[0]
    model = _model(config)
    plan = plan_for_saving(model, 0.3, "heads-mlp", head_policy="tp-magnitude", mlp_policy="tp-magnitude")
    pruned = apply_plan(copy.deepcopy(model), plan)
    saving = 1 - count_macs(pruned).total / count_macs(model).total
    assert abs(saving - 0.3) < 0.03 and plan.ratios["target_macs_saving"] == 0.3
    with torch.no_grad():
        reloaded = load_pruned(save_pruned(pruned, tmp_path / "peer.pt"))
        assert torch.allclose(reloaded(*_inputs(model)), pruned(*_inputs(model)), atol=1e-6)
    mlp_only = plan_for_saving(model, 0.2, "mlp", mlp_policy="tp-magnitude")
    assert [len(h) for h in mlp_only.kept_heads] == [config.num_heads] * config.depth


def test_make_plan_hands_peer_policies_to_the_peer():
    model = _model(CONFIGS[0])
    direct = peer_plan(model, 0.25, 0.25, "tp-magnitude")
    via_planner = make_plan(model, heads=0.25, mlp=0.25, head_policy="tp-magnitude", mlp_policy="tp-magnitude")
    assert via_planner.to_dict() == direct.to_dict()
    with pytest.raises(InputError, match="together"):
        make_plan(model, heads=0.25, mlp=0.25, head_policy="tp-magnitude", mlp_policy="taylor")
    with pytest.raises(InputError, match="unpruned"):
        peer_plan(apply_plan(copy.deepcopy(model), direct), 0.25, 0.25, "tp-magnitude")


def test_configurations_name_the_peer():
    spec = PruneSpec(saving=0.4, by="heads-mlp", head_policy="tp-taylor", mlp_policy="tp-taylor")
    assert spec.config_id == "save0.4:heads:tp-taylor+mlp:tp-taylor"
    assert PruneSpec.from_config_id(spec.config_id) == spec
    with pytest.raises(InputError, match="together"):
        PruneSpec(saving=0.4, by="all", head_policy="tp-taylor", mlp_policy="tp-taylor")


def test_a_missing_peer_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import then raises ImportError
    with pytest.raises(PeerUnavailable, match=r"\.\[peers\]"):
        peer_plan(_model(CONFIGS[0]), 0.25, 0.25, "tp-magnitude")
