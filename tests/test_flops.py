"""fvcore MAC counts against the analytic per-block formula, for unpruned and pruned models."""

from __future__ import annotations

import copy

import pytest
import torch

from amg.measure.flops import analytic_block_macs, count_macs, sdpa_macs
from amg.model.attention import patch_model
from amg.model.config import ModelConfig
from amg.model.pruned import apply_plan
from amg.model.vit import ReIDViT, build_model
from amg.pruning.planner import make_plan

CONFIG = ModelConfig("flops", img_size=(128, 64), embed_dim=96, depth=4, num_heads=6, mlp_ratio=3.0)


def model_for(heads: float, tokens: float, config: ModelConfig = CONFIG) -> ReIDViT:
    torch.manual_seed(0)
    model = ReIDViT(config).eval()
    plan = make_plan(model, heads=heads, tokens=tokens, head_policy="random", token_policy="random", seed=1)
    return apply_plan(model, plan)


def analytic_blocks(model: ReIDViT) -> list[int]:
    config = model.config
    hidden = int(config.embed_dim * config.mlp_ratio)
    out = []
    for module in patch_model(model):
        kv = config.num_tokens if module.kv_index is None else len(module.kv_index)
        out.append(sum(analytic_block_macs(config.num_tokens, kv, config.embed_dim, module.num_heads,
                                           module.head_dim, hidden).values()))
    return out


@pytest.mark.parametrize("heads, tokens", [(0, 0), (0.5, 0), (0, 0.5), (0.34, 0.25)])
def test_fvcore_matches_the_analytic_formula_per_block(heads, tokens):
    model = model_for(heads, tokens)
    report = count_macs(model)
    for block, expected in enumerate(analytic_blocks(model)):
        counted = report.by_module[f"backbone.blocks.{block}.attn"] + report.by_module[f"backbone.blocks.{block}.mlp"]
        assert counted == expected, f"block {block}"  # exact: the formula is the graph's own arithmetic


def test_vit_small_count_includes_fused_attention():
    # Without the SDPA handle fvcore reports 2.783 GMACs for ViT-Small at 256x128 (the attention matmuls go uncounted).
    report = count_macs(build_model("vit_small").eval())
    assert report.gmacs_per_image == pytest.approx(2.936, abs=0.001)
    assert report.params == 21_640_320


def test_batch_scales_the_count():
    model = model_for(0, 0)
    assert count_macs(model, batch=4).total == 4 * count_macs(model, batch=1).total


@pytest.mark.parametrize("axis", ["heads", "tokens"])
def test_macs_fall_monotonically_with_each_ratio(axis):
    counts = [count_macs(model_for(**{"heads": 0.0, "tokens": 0.0, axis: r})).total for r in (0, 0.2, 0.4, 0.6, 0.8)]
    assert all(a > b for a, b in zip(counts, counts[1:])), counts


def test_sdpa_handle_counts_qk_and_av():
    class FakeValue:
        def __init__(self, shape):
            self.shape = shape

        def type(self):
            return self

        def sizes(self):
            return self.shape

    counter = sdpa_macs([FakeValue([2, 3, 10, 8]), FakeValue([2, 3, 7, 8]), FakeValue([2, 3, 7, 5])], [])
    assert counter["scaled_dot_product_attention"] == 2 * 3 * 10 * 7 * (8 + 5)


def test_counting_leaves_training_mode_alone():
    model = copy.deepcopy(model_for(0, 0)).train()
    count_macs(model)
    assert model.training


@pytest.mark.parametrize("mode, target", [("heads", 0.3), ("both", 0.2), ("tokens", 0.1)])
def test_plan_for_saving_reaches_the_measured_target(mode, target):
    from amg.pruning.macs_target import plan_for_saving

    torch.manual_seed(0)
    model = ReIDViT(CONFIG).eval()
    plan = plan_for_saving(model, target, mode, head_policy="random", token_policy="random", seed=2)
    saved = 1 - count_macs(apply_plan(copy.deepcopy(model), plan)).total / count_macs(model).total
    assert saved == pytest.approx(target, abs=0.02)  # of the whole model, as the CSV's macs_saving
    assert plan.ratios["target_macs_saving"] == target


@pytest.mark.parametrize("policy, target", [("tome", 0.25), ("evit", 0.3), ("evit", 0.45)])
def test_plan_for_saving_finds_the_dynamic_amount(policy, target):
    from amg.pruning.macs_target import DYNAMIC_SAVING_TOLERANCE, plan_for_saving

    torch.manual_seed(0)
    model = ReIDViT(CONFIG).eval()
    plan = plan_for_saving(model, target, "tokens", token_policy=policy)
    assert plan.dynamic_tokens["policy"] == policy and plan.ratios["tokens"] > 0
    saved = 1 - count_macs(apply_plan(copy.deepcopy(model), plan)).total / count_macs(model).total
    assert saved == pytest.approx(target, abs=DYNAMIC_SAVING_TOLERANCE if policy == "tome" else 0.02)


def test_unreachable_saving_is_explained():
    from amg.pruning.macs_target import OutOfReach, plan_for_saving

    with pytest.raises(OutOfReach, match="out of reach by tokens"):
        plan_for_saving(ReIDViT(CONFIG).eval(), 0.6, "tokens", token_policy="random")
    with pytest.raises(OutOfReach, match="out of reach by tome"):
        plan_for_saving(ReIDViT(CONFIG).eval(), 0.95, "tokens", token_policy="tome")
    with pytest.raises(ValueError, match="by tokens alone"):
        plan_for_saving(ReIDViT(CONFIG).eval(), 0.2, "both", token_policy="tome")
