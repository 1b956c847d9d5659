"""The last block computed for the class token alone: the same features, fewer MACs."""

from __future__ import annotations

import copy

import pytest
import torch

from amg.errors import InputError
from amg.measure.flops import count_macs
from amg.model.attention import capture_attention
from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan, load_pruned, save_pruned
from amg.model.vit import ReIDViT, build_model
from amg.pruning.planner import make_plan

CONFIGS = {
    "d3-w48-h4": ModelConfig("a", img_size=(64, 32), embed_dim=48, depth=3, num_heads=4),
    "d2-w64-h4-nobias-overlap": ModelConfig("b", img_size=(64, 32), embed_dim=64, depth=2, num_heads=4,
                                            qkv_bias=False, patch_stride=12),
    "d4-w48-h6-sie": ModelConfig("c", img_size=(64, 48), embed_dim=48, depth=4, num_heads=6, num_cameras=3,
                                 mlp_ratio=2.0),
}


def _model_and_inputs(name: str):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = ReIDViT(config).eval()
    with torch.no_grad():
        model.neck.running_mean.normal_(0, 0.1)
    images = torch.randn(3, 3, *config.img_size)
    cams = torch.arange(3) % 3 if config.num_cameras else None
    return model, images, cams


def _plans(config: ModelConfig) -> dict[str, PrunePlan | None]:
    model = ReIDViT(config).eval()
    emptied = make_plan(model, heads=0.34, tokens=0.4, head_policy="random", token_policy="random", seed=1)
    emptied.kept_heads[-1], emptied.kept_tokens[-1] = [], None
    return {"unpruned": None,
            "heads+tokens": make_plan(model, heads=0.34, tokens=0.4, head_policy="random", token_policy="random"),
            "last block emptied": emptied}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("plan_name", ["unpruned", "heads+tokens", "last block emptied"])
def test_the_features_equal_the_full_model_and_cost_fewer_macs(name, plan_name):
    model, images, cams = _model_and_inputs(name)
    plan = _plans(model.config)[plan_name]
    if plan is not None:
        apply_plan(model, plan)
    full = copy.deepcopy(model)
    fast = copy.deepcopy(model).use_class_token_last_block()
    with torch.no_grad():
        expected, got = full(images, cams), fast(images, cams)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert count_macs(fast).total < count_macs(full).total
    with torch.no_grad():  # every token is still there for whoever asks for them
        assert fast.forward_tokens(images, cams).shape[1] == model.config.num_tokens


def test_capture_and_dynamic_blocks_get_the_whole_last_block():
    model, images, cams = _model_and_inputs("d3-w48-h4")
    model.use_class_token_last_block()
    with torch.no_grad(), capture_attention(model) as capture:
        model(images, cams)
    (last,) = capture.maps(model.config.depth - 1)
    assert last.shape[-2] == model.config.num_tokens  # all queries recorded, for scoring
    tome = apply_plan(copy.deepcopy(model), make_plan(model, tokens=0.3, token_policy="tome"))
    reference = copy.deepcopy(tome)
    reference.class_token_only = False
    with torch.no_grad():
        assert torch.equal(tome(images, cams), reference(images, cams))
    assert model.class_token_block_active and not tome.class_token_block_active  # as the CSV says


def test_the_choice_travels_in_the_model_file(tmp_path):
    model, images, cams = _model_and_inputs("d4-w48-h6-sie")
    apply_plan(model, _plans(model.config)["heads+tokens"])
    fast = load_pruned(save_pruned(copy.deepcopy(model).use_class_token_last_block(), tmp_path / "fast.pt"))
    full = load_pruned(save_pruned(model, tmp_path / "full.pt"))
    assert fast.class_token_block_active and not full.class_token_block_active
    assert count_macs(fast).total < count_macs(full).total
    with torch.no_grad():
        assert torch.allclose(fast(images, cams), full(images, cams), atol=1e-5)


def test_a_model_reading_patch_tokens_keeps_its_last_block():
    class PartBased(ReIDViT):
        reads_patch_tokens = True

    model = PartBased(CONFIGS["d3-w48-h4"])
    with pytest.raises(InputError, match="patch tokens"):
        model.use_class_token_last_block()
    assert not model.use_class_token_last_block(False).class_token_block_active


@pytest.mark.parametrize("preset", ["vit_small", "transreid_base"])
def test_deployment_presets_keep_their_features_pruned_or_not(preset):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    config = model.config
    images = torch.randn(2, 3, *config.img_size)
    cams = torch.tensor([0, 1]) if config.num_cameras else None
    plan = make_plan(model, heads=0.3, tokens=0.3, mlp=0.3, head_policy="random", token_policy="random",
                     mlp_policy="random")
    for candidate in (model, apply_plan(copy.deepcopy(model), plan)):
        fast = copy.deepcopy(candidate).use_class_token_last_block()
        with torch.no_grad():
            expected, got = candidate(images, cams), fast(images, cams)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
