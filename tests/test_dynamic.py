"""EViT-style dropping and ToMe-style merging: the tensor math and the patched models."""

from __future__ import annotations

import copy

import pytest
import torch

from amg.measure.flops import count_macs
from amg.model.config import ModelConfig
from amg.model.dynamic import apply_dynamic, bipartite_merge, evit_reduce
from amg.model.pruned import apply_plan
from amg.model.vit import ReIDViT
from amg.pruning.planner import make_plan

CONFIG = ModelConfig("dyn", img_size=(64, 32), embed_dim=48, depth=4, num_heads=3)


def test_evit_keeps_the_most_attended_and_fuses_the_rest():
    x = torch.arange(10, dtype=torch.float).reshape(1, 5, 2)  # tokens 0 (class) .. 4
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # over patch tokens 1..4
    out = evit_reduce(x, attention, keep=2)
    assert out.shape == (1, 4, 2)
    assert torch.equal(out[0, 0], x[0, 0])
    assert torch.equal(out[0, 1:3], x[0, [2, 4]])  # patches with 0.4 and 0.3, in original order
    assert torch.allclose(out[0, 3], (0.1 * x[0, 1] + 0.2 * x[0, 3]) / 0.3)
    with pytest.raises(ValueError, match="EViT keeps"):
        evit_reduce(x, attention, keep=4)


def test_tome_merge_keeps_class_token_and_mass():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    size = torch.ones(2, 9, 1)
    merged, merged_size = bipartite_merge(x, size, metric=torch.randn(2, 9, 3), r=3)
    assert merged.shape == (2, 6, 4) and merged_size.shape == (2, 6, 1)
    assert torch.equal(merged[:, 0], x[:, 0]) and torch.all(merged_size[:, 0] == 1)
    assert torch.allclose(merged_size.sum(dim=1), torch.full((2, 1), 9.0))
    # a size-weighted average moves no mass: sum(size * x) is unchanged
    assert torch.allclose((merged * merged_size).sum(dim=1), x.sum(dim=1), atol=1e-5)
    same, same_size = bipartite_merge(x, size, torch.randn(2, 9, 3), r=0)
    assert same is x and same_size is size


def test_tome_merges_the_most_similar_pair():
    x = torch.tensor([[[0.0, 0], [1, 0], [0, 1], [0.9, 0.1], [-1, 0]]])  # A: 0, 2, 4; B: 1, 3
    merged, size = bipartite_merge(x, torch.ones(1, 5, 1), metric=x.clone() + 1e-3, r=1)
    # best A->B edges: 2 -> 3 (cos 0.11) and 4 -> 3 (cos -0.99); with r = 1 token 2 merges into 3,
    # which comes last: unmerged A (0, 4) first, then B (1, 3)
    assert merged.shape == (1, 4, 2)
    assert torch.allclose(merged[0, -1], (x[0, 2] + x[0, 3]) / 2)
    assert size[0, -1].item() == 2


def build() -> ReIDViT:
    torch.manual_seed(0)
    return ReIDViT(CONFIG).eval()


@pytest.mark.parametrize("policy, amount", [("evit", 0.5), ("tome", 2)])
def test_patched_models_run_and_cost_less(policy, amount):
    model = build()
    dynamic = apply_dynamic(copy.deepcopy(model), policy, amount)
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        features = dynamic(images)
        again = dynamic(images)  # ToMe's shared sizes reset between forward passes
    assert features.shape == (3, 48) and torch.equal(features, again)
    assert count_macs(dynamic).total < count_macs(model).total
    assert dynamic.dynamic_tokens["policy"] == policy


def test_dynamic_policies_refuse_static_kv_pruning_and_bad_amounts():
    model = apply_plan(build(), make_plan(build(), tokens=0.3, token_policy="random"))
    with pytest.raises(ValueError, match="static K/V index"):
        apply_dynamic(model, "tome", 2)
    with pytest.raises(ValueError, match="keep rate"):
        apply_dynamic(build(), "evit", 1.2)
    with pytest.raises(ValueError, match="whole number"):
        apply_dynamic(build(), "tome", 0.5)
    with pytest.raises(ValueError, match="unknown dynamic token policy"):
        apply_dynamic(build(), "dynamicvit", 0.5)


def test_dynamic_on_a_head_pruned_model():
    model = apply_plan(build(), make_plan(build(), heads=0.34, head_policy="random"))
    dynamic = apply_dynamic(model, "evit", 0.7)
    with torch.no_grad():
        assert dynamic(torch.randn(2, 3, 64, 32)).shape == (2, 48)


@pytest.mark.parametrize("policy", ["evit", "tome"])
def test_dynamic_policy_travels_in_the_plan(policy, tmp_path):
    from amg.model.pruned import load_pruned, save_pruned

    model = build()
    plan = make_plan(model, heads=0.34, tokens=0.3, head_policy="random", token_policy=policy)
    assert plan.dynamic_tokens["policy"] == policy and all(t is None for t in plan.kept_tokens)
    pruned = apply_plan(copy.deepcopy(model), plan)
    loaded = load_pruned(save_pruned(pruned, tmp_path / "dyn.pt"))
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(pruned(images), loaded(images))
