"""Pruning core: physical pruning equals masking, plans are deterministic, saving round-trips, bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from amg.measure.flops import count_macs
from amg.model.attention import capture_attention, patch_model
from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan, load_pruned, save_pruned
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages
from amg.pruning.planner import make_plan
from amg.pruning.selection import select_heads, select_tokens

# ViTs the code was not written around: depth, width, heads, bias, overlapping patches, SIE.
CONFIGS = {
    "d2-w64-h4-nobias": ModelConfig("t1", img_size=(64, 32), embed_dim=64, depth=2, num_heads=4, qkv_bias=False),
    "d3-w96-h3-overlap": ModelConfig("t2", img_size=(64, 32), embed_dim=96, depth=3, num_heads=3, patch_stride=12),
    "d4-w48-h6-sie": ModelConfig("t3", img_size=(64, 48), embed_dim=48, depth=4, num_heads=6, num_cameras=3,
                                 mlp_ratio=2.0),
}


def build(config: ModelConfig, seed: int = 0) -> ReIDViT:
    torch.manual_seed(seed)
    model = ReIDViT(config, num_classes=6).eval()
    with torch.no_grad():  # trained-looking statistics, so the neck does not hide differences
        model.neck.running_mean.normal_(0, 0.1)
    return model


def inputs(config: ModelConfig, batch: int = 3):
    torch.manual_seed(1)
    images = torch.randn(batch, 3, *config.img_size)
    cams = torch.arange(batch) % 3 if config.num_cameras else None
    return images, cams


def masked_reference(model: ReIDViT, plan: PrunePlan, images, cams) -> torch.Tensor:
    """The unpruned model with removed heads' values zeroed and dropped keys masked out of the softmax."""
    reference = copy.deepcopy(model)
    vit = reference.backbone
    masks = []
    for block, heads, tokens in zip(vit.blocks, plan.kept_heads, plan.kept_tokens):
        attn = block.attn
        inner, dim = attn.num_heads * attn.head_dim, attn.head_dim
        with torch.no_grad():
            for head in set(range(attn.num_heads)) - set(heads):
                rows = slice(2 * inner + head * dim, 2 * inner + (head + 1) * dim)
                attn.qkv.weight[rows] = 0
                if attn.qkv.bias is not None:
                    attn.qkv.bias[rows] = 0
        n = model.config.num_tokens
        mask = torch.ones(n, n, dtype=torch.bool)
        if tokens is not None:
            mask[:, [p for p in range(n) if p not in tokens]] = False
        masks.append(mask)
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        if reference.sie_embed is not None:
            x = x + reference.config.sie_scale * reference.sie_embed[cams]
        for block, mask in zip(vit.blocks, masks):
            x = block(x, attn_mask=mask)
        return reference.neck(vit.norm(x)[:, 0])


def random_plan(config: ModelConfig, heads: float, tokens: float, seed: int = 0) -> PrunePlan:
    model = build(config)
    return make_plan(model, heads=heads, tokens=tokens, head_policy="random", token_policy="random", seed=seed)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("heads, tokens", [(0.34, 0.0), (0.0, 0.4), (0.34, 0.4)])
def test_physical_pruning_equals_masking(name, heads, tokens):
    config = CONFIGS[name]
    model = build(config)
    plan = random_plan(config, heads, tokens)
    pruned = apply_plan(copy.deepcopy(model), plan)
    images, cams = inputs(config)
    with torch.no_grad():
        got = pruned(images, cams)
    expected = masked_reference(model, plan, images, cams)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if heads:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_ratio_zero_is_the_unpruned_model_exactly(name):
    config = CONFIGS[name]
    model = build(config)
    images, cams = inputs(config)
    with torch.no_grad():
        before = model(images, cams)
        after = apply_plan(copy.deepcopy(model), make_plan(model, heads=0.0, tokens=0.0))(images, cams)
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", CONFIGS)
def test_capturing_path_matches_fused_path(name):
    config = CONFIGS[name]
    model = apply_plan(build(config), random_plan(config, 0.34, 0.4))
    images, cams = inputs(config)
    with torch.no_grad():
        fused = model(images, cams)
        with capture_attention(model) as capture:
            explicit = model(images, cams)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert len(capture.blocks) == config.depth
    for block, module in enumerate(patch_model(model)):
        (attn,) = capture.maps(block)
        assert attn.shape[1:] == (module.num_heads, config.num_tokens, len(module.kv_index))
        assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    assert all(m.recorder is None for m in patch_model(model))  # the model is left clean


def calibration_data(config: ModelConfig, count: int = 8) -> CalibrationImages:
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (count, 3, *config.img_size), dtype=torch.uint8, generator=generator)
    return CalibrationImages(images, labels=[i % 6 for i in range(count)], camids=[i % 3 for i in range(count)],
                           description={"images": count, "source": "test"})


@pytest.mark.parametrize("head_policy", ["amg", "amg-lowest", "gradient", "magnitude", "random"])
def test_same_seed_and_data_give_the_same_plan(head_policy):
    config = CONFIGS["d4-w48-h6-sie"]
    plans = [make_plan(build(config), heads=0.3, tokens=0.3, head_policy=head_policy,
                       data=calibration_data(config), seed=3).to_dict() for _ in range(2)]
    assert plans[0] == plans[1]
    assert plans[0]["policy"]["heads"] == head_policy


@pytest.mark.parametrize("allocation", ["global", "keep-one"])
def test_amg_head_scores_follow_entropy(allocation):
    """Removing by entropy: the plan drops exactly the highest-scaled-entropy heads (and with
    `keep-one`, never a block's last head)."""
    from amg.pruning import scores as S

    config = CONFIGS["d4-w48-h6-sie"]
    model = build(config)
    data = calibration_data(config)
    calibration = data.run(copy.deepcopy(model), None)
    entropy = [S.head_entropy(a) * (1 + S.HEAD_LAYER_SCALE * b) for b, a in enumerate(calibration.mean_attention)]
    plan = make_plan(model, heads=0.5, data=data, allocation=allocation)
    removed = {(b, h) for b in range(config.depth) for h in range(6) if h not in plan.kept_heads[b]}
    flat = sorted((-float(e), b, h) for b, row in enumerate(entropy) for h, e in enumerate(row))
    expected, left = set(), [6] * config.depth
    for _, block, head in flat:  # highest first; a tie goes to the earlier block, then the lower head
        if len(expected) < 12 and (allocation == "global" or left[block] > 1):
            expected.add((block, head))
            left[block] -= 1
    assert removed == expected
    # entropy of a uniform map over N keys is log2(N); of a one-hot map 0
    uniform = torch.full((1, 4, 8), 1 / 8)
    one_hot = torch.zeros(1, 4, 8)
    one_hot[..., 0] = 1
    assert S.head_entropy(uniform).item() == pytest.approx(3.0)
    assert S.head_entropy(one_hot).item() == pytest.approx(0.0)


def test_saved_pruned_model_reloads_identically(tmp_path):
    config = CONFIGS["d3-w96-h3-overlap"]
    model = apply_plan(build(config), random_plan(config, 0.34, 0.4))
    path = save_pruned(model, tmp_path / "pruned.pt")
    loaded = load_pruned(path)
    images, cams = inputs(config)
    with torch.no_grad():
        assert torch.equal(model(images, cams), loaded(images, cams))
    assert loaded.plan.to_dict() == model.plan.to_dict()
    assert PrunePlan.load(model.plan.save(tmp_path / "plan.json")).to_dict() == model.plan.to_dict()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio):
    config = CONFIGS["d2-w64-h4-nobias"]
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        make_plan(build(config), heads=ratio, head_policy="random")
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        make_plan(build(config), tokens=ratio, token_policy="random")


@pytest.mark.parametrize("name", CONFIGS)
def test_an_emptied_block_equals_zeroing_all_its_heads(name, tmp_path):
    """The reference may remove every head of a block: the block is then its MLP plus the
    projection's bias, exactly the masked model, with no attention MACs, and it reloads."""
    config = CONFIGS[name]
    model = build(config)
    plan = random_plan(config, 0.34, 0.4)
    plan.kept_heads[1], plan.kept_tokens[1] = [], None
    pruned = apply_plan(copy.deepcopy(model), plan)
    images, cams = inputs(config)
    with torch.no_grad():
        got = pruned(images, cams)
        reloaded = load_pruned(save_pruned(pruned, tmp_path / "emptied.pt"))(images, cams)
    expected = masked_reference(model, plan, images, cams)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert torch.equal(got, reloaded)
    assert count_macs(pruned).by_module["backbone.blocks.1.attn"] == 0


def test_emptied_blocks_refuse_what_they_cannot_do():
    config = CONFIGS["d2-w64-h4-nobias"]
    plan = PrunePlan.unpruned(config)
    plan.kept_heads[1], plan.kept_tokens[1] = [], [0, 1, 2]
    with pytest.raises(ValueError, match="block 1 keeps no head, so it has no key/value positions"):
        apply_plan(build(config), plan)
    plan.kept_tokens[1], plan.dynamic_tokens = None, {"policy": "tome", "amount": 1}
    with pytest.raises(ValueError, match="dynamic token policies"):
        apply_plan(build(config), plan)


def test_keep_one_never_empties_a_block_and_global_keeps_one_head_in_the_model():
    scores = [torch.rand(4), torch.rand(4)]
    kept = select_heads(scores, [range(4), range(4)], 0.99, allocation="keep-one")
    assert [len(k) for k in kept] == [1, 1]
    kept = select_heads(scores, [range(4), range(4)], 0.99, allocation="global")
    assert sum(len(k) for k in kept) == 1  # 0.99 of 8 rounds to 8: one head stays for the class token
    # a block down to one head is left out of the reference's ranking (an iterative round never empties it)
    kept = select_heads([torch.tensor([9.0]), torch.rand(4)], [[2], range(4)], 0.75, allocation="global",
                        total_heads=8)
    assert kept[0] == [2] and len(kept[1]) == 1


def test_plan_for_another_model_is_refused():
    plan = random_plan(CONFIGS["d2-w64-h4-nobias"], 0.25, 0.25)
    with pytest.raises(ValueError, match="plan does not fit the model"):
        apply_plan(build(CONFIGS["d3-w96-h3-overlap"]), plan)
    broken = dataclasses.replace(plan, kept_tokens=[[1, 2, 3]] * 2)
    with pytest.raises(ValueError, match="class token"):
        apply_plan(build(CONFIGS["d2-w64-h4-nobias"]), broken)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    config = CONFIGS["d2-w64-h4-nobias"]
    model = apply_plan(build(config), random_plan(config, 0.25, 0.0))
    path = save_pruned(model, tmp_path / "pruned.pt")
    payload = torch.load(path, weights_only=True)
    payload["plan"]["kept_heads"] = [[0, 1, 2, 3]] * 2  # claims unpruned, weights are pruned
    torch.save(payload, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pruned(path)


def test_token_selection_keeps_the_class_token_and_a_patch_per_block():
    keep = select_tokens([torch.tensor([0.0, 5, 4, 3]), torch.tensor([9.0, 0.1, 0.2, 0.3])], ratio=0.5)
    # 6 candidates, drop 3 lowest globally: block 1's 0.1 and 0.2; its 0.3 must stay (one patch per
    # block), so the third drop is block 0's lowest (3.0, position 3). Class tokens always stay.
    assert keep[1] == [0, 3] and keep[0] == [0, 1, 2]


def test_per_block_allocation_removes_the_exact_total_evenly():
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.4]) * (b + 1) for b in range(6)]
    kept = select_heads(scores, [range(6)] * 6, 0.25, allocation="per-block")
    removed = [6 - len(k) for k in kept]
    assert sum(removed) == 9  # round(0.25 * 36), not 2 per block
    assert set(removed) == {1, 2}
    assert all(1 not in k for k in kept)  # each block's top-scoring head goes first
    # the extra removals go to the blocks whose next head scores highest (the deepest here)
    assert removed == [1, 1, 1, 2, 2, 2]
