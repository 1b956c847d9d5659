"""MLP channel pruning: physically sliced fc1/fc2 equal to zeroed channels, exact MACs, plans
that round-trip, Taylor scores as defined, MACs targets by MLP and by everything."""

from __future__ import annotations

import copy

import pytest
import torch

from amg.benchmark.profiles import PruneSpec
from amg.errors import InputError
from amg.measure.flops import count_macs, plan_macs
from amg.model.config import ModelConfig
from amg.model.mlp import mlp_channel_ids
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan, load_pruned, save_pruned
from amg.model.vit import ReIDViT
from amg.pruning.macs_target import plan_for_saving, reachable_savings
from amg.pruning.planner import make_plan
from amg.pruning.selection import check_channels_removed, select_channels

CONFIGS = [
    ModelConfig("mlp-test", img_size=(64, 32), embed_dim=48, depth=3, num_heads=3),
    ModelConfig("mlp-test-sie", img_size=(64, 32), embed_dim=48, depth=2, num_heads=3, num_cameras=3,
                patch_stride=12, qkv_bias=False),
]


def _model(config: ModelConfig) -> ReIDViT:
    torch.manual_seed(0)
    return ReIDViT(config).eval()


def _inputs(model: ReIDViT):
    images = torch.randn(2, 3, *model.config.img_size, generator=torch.Generator().manual_seed(1))
    return images, (torch.tensor([0, 2]) if model.sie_embed is not None else None)


def _some_channels(config: ModelConfig) -> list[list[int] | None]:
    generator = torch.Generator().manual_seed(3)
    kept = [sorted(torch.randperm(config.mlp_hidden, generator=generator)[:config.mlp_hidden // 3].tolist())
            for _ in range(config.depth)]
    kept[-1] = None  # a block left whole
    return kept


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_a_removed_channel_equals_a_zeroed_one(config):
    model = _model(config)
    kept = _some_channels(config)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, channels in zip(masked.backbone.blocks, kept):
            if channels is None:
                continue
            dropped = sorted(set(range(config.mlp_hidden)) - set(channels))
            layer.mlp.fc1.weight[dropped] = 0  # GELU(0) = 0: the channel adds nothing to fc2's output
            layer.mlp.fc1.bias[dropped] = 0
    plan = PrunePlan.unpruned(config)
    plan.kept_mlp = kept
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.backbone.blocks[0].mlp.fc1.out_features == len(kept[0])
    assert "backbone.blocks.0.mlp.fc1.weight" in pruned.state_dict()  # timm's names kept
    with torch.no_grad():
        assert torch.allclose(pruned(*_inputs(model)), masked(*_inputs(model)), atol=1e-5)


def test_mlp_pruning_combines_with_heads_tokens_and_the_class_token_block():
    config = CONFIGS[0]
    model = _model(config)
    plan = make_plan(model, heads=0.34, tokens=0.3, head_policy="random", token_policy="random", mlp=0.5,
                     mlp_policy="random")
    pruned = apply_plan(copy.deepcopy(model), plan)
    full = copy.deepcopy(pruned)
    pruned.use_class_token_last_block()
    with torch.no_grad():
        assert torch.allclose(pruned(*_inputs(model)), full(*_inputs(model)), atol=1e-5)


def test_fvcore_counts_what_the_plan_says(tmp_path):
    config = CONFIGS[0]
    model = _model(config)
    plan = make_plan(model, heads=0.34, mlp=0.4, head_policy="random", mlp_policy="magnitude")
    pruned = apply_plan(copy.deepcopy(model), plan)
    rest = count_macs(model).total - plan_macs(config, PrunePlan.unpruned(config))
    assert count_macs(pruned).total == rest + plan_macs(config, plan)
    assert count_macs(pruned).total < count_macs(apply_plan(copy.deepcopy(model), make_plan(
        model, heads=0.34, head_policy="random"))).total
    # the plan travels in the model file and as JSON
    loaded = load_pruned(save_pruned(pruned, tmp_path / "pruned.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(*_inputs(model)), pruned(*_inputs(model)))
    assert [mlp_channel_ids(layer.mlp) for layer in loaded.backbone.blocks] == \
        [c if c is not None else list(range(config.mlp_hidden)) for c in plan.kept_mlp]
    assert PrunePlan.load(plan.save(tmp_path / "plan.json")) == plan
    old = plan.to_dict()
    del old["kept_mlp"]  # a plan written before MLP pruning existed
    assert PrunePlan.from_dict(old).kept_mlp is None


def test_plans_that_do_not_fit_name_the_block():
    config = CONFIGS[0]
    plan = PrunePlan.unpruned(config)
    plan.kept_mlp = [None, [], None]
    with pytest.raises(InputError, match="block 1: MLP channels"):
        plan.check_fits(config)
    plan.kept_mlp = [None, [config.mlp_hidden], None]
    with pytest.raises(InputError, match="block 1: MLP channels"):
        plan.check_fits(config)
    plan.kept_mlp = [None]
    with pytest.raises(InputError, match="MLP channels for 1 blocks, model has 3"):
        plan.check_fits(config)


def test_channel_selection_allocations_and_rounding():
    scores = [torch.arange(32, dtype=torch.float) * 10, torch.arange(32, dtype=torch.float)]
    ids = [list(range(32)), list(range(32))]
    glob = select_channels(scores, ids, 0.5)
    assert sum(map(len, glob)) == 32 and len(glob[0]) > len(glob[1])  # block 0's scores are larger
    assert glob[0] == list(range(32 - len(glob[0]), 32))  # its highest-scored channels
    normalized = select_channels(scores, ids, 0.5, "normalized")
    assert len(normalized[0]) == len(normalized[1]) == 16 and normalized[1] == list(range(16, 32))
    per_block = select_channels(scores, ids, 0.25, "per-block")
    assert [len(k) for k in per_block] == [24, 24]
    rounded = select_channels(scores, ids, 0.7, "global", multiple=8)
    assert all(len(k) % 8 == 0 and len(k) >= 8 for k in rounded)
    with pytest.raises(InputError, match="MLP channel ratio must be in"):
        select_channels(scores, ids, 1.0)
    check_channels_removed(rounded, ids, 0.7, 8)
    kept_all = select_channels(scores, ids, 0.3, "global", multiple=100_000)  # a search's probe may round so...
    with pytest.raises(InputError, match="to a multiple of 100000 keeps all of them"):  # ...a plan may not
        check_channels_removed(kept_all, ids, 0.3, 100_000)


def test_taylor_scores_are_activation_times_gradient_summed_over_tokens(tiny_trained):
    from amg.data.transforms import normalize
    from amg.pruning.calibration import CalibrationImages
    from amg.pruning.calibration_loss import calibration_loss

    dataset, model = tiny_trained
    data = CalibrationImages.from_dataset(dataset, model.config.img_size, count=8, batch_size=8)
    stats = data.run(copy.deepcopy(model), None, gradients=True, mlp=True)
    # independently: hook the activation, backprop the same ID loss, sum |sum_t h*g| over images
    work = copy.deepcopy(model).eval()
    kept = {}

    def keep(module, inputs, output):
        output.retain_grad()
        kept["h"] = output

    handle = work.backbone.blocks[1].mlp.act.register_forward_hook(keep)
    images = normalize(data.images).requires_grad_(True)
    calibration_loss(work, images, torch.as_tensor(data.labels), None, "id", None).backward()
    handle.remove()
    expected = (kept["h"] * kept["h"].grad).sum(dim=1).abs().sum(dim=0)
    assert torch.allclose(stats.mlp_taylor[1], expected.detach(), rtol=1e-4, atol=1e-8)
    plan = make_plan(model, mlp=0.5, mlp_policy="taylor", data=data)
    assert plan.policy["mlp"] == "taylor" and plan.ratios["mlp"] == 0.5
    kept_total = sum(len(c) if c is not None else model.config.mlp_hidden for c in plan.kept_mlp)
    assert kept_total == model.config.depth * model.config.mlp_hidden // 2


def test_macs_targets_by_mlp_and_by_everything_reach_further(tiny_trained):
    from amg.pruning.calibration import CalibrationImages

    dataset, model = tiny_trained
    reach = reachable_savings(model.config)
    assert reach["mlp"] > reach["heads (global)"] and reach["heads (global) + tokens + mlp"] > reach["mlp"]
    data = CalibrationImages.from_dataset(dataset, model.config.img_size, count=8)
    base = count_macs(model).total
    for mode, target in (("mlp", 0.3), ("all", 0.5)):
        plan = plan_for_saving(model, target, mode, mlp_policy="taylor", data=data)
        saved = 1 - count_macs(apply_plan(copy.deepcopy(model), plan)).total / base
        assert saved == pytest.approx(target, abs=0.03), mode
        assert plan.kept_mlp is not None and (plan.heads_kept < model.config.depth * model.config.num_heads) == \
            (mode == "all")


def test_config_ids_of_mlp_configurations_read_back():
    for spec in (PruneSpec(mlp=0.3, mlp_policy="taylor"), PruneSpec(heads=0.25, tokens=0.25, mlp=0.5),
                 PruneSpec(saving=0.4, by="all", mlp_policy="random", head_policy="random", token_policy="random"),
                 PruneSpec(saving=0.3, by="mlp", allocation="per-block")):
        assert PruneSpec.from_config_id(spec.config_id) == spec, spec.config_id
    assert PruneSpec(mlp=0.3).config_id == "mlp0.3:taylor"
    assert PruneSpec(saving=0.4, by="all").config_id == "save0.4:heads:amg+tokens:amg+mlp:taylor"
    assert PruneSpec(mlp=0.3, mlp_policy="random", seed=1).random
    with pytest.raises(InputError, match="`by` must be one of"):
        PruneSpec(saving=0.3, by="channels")


def test_the_prune_command_rounds_channels_and_prunes_them_iteratively(tiny_trained, tmp_path):
    from amg.cli import main

    dataset, model = tiny_trained
    model_file = save_pruned(model, tmp_path / "model.pt")
    assert main(["prune", "--model", str(model_file), "--mlp", "0.6", "--mlp-policy", "magnitude",
                 "--mlp-multiple", "8", "--data", str(dataset.root), "--out", str(tmp_path / "mlp.pt"),
                 "--plan-out", str(tmp_path / "plan.json")]) == 0
    plan = PrunePlan.load(tmp_path / "plan.json")
    assert all(len(c) % 8 == 0 for c in plan.kept_mlp if c is not None)
    # iterative: heads over the rounds, then the MLP channels, each stage fine-tuned
    assert main(["prune", "--model", str(model_file), "--heads", "0.3", "--mlp", "0.4", "--mlp-policy", "magnitude",
                 "--iterative-rounds", "2", "--finetune-steps", "1", "--data", str(dataset.root),
                 "--out", str(tmp_path / "iterative.pt"), "--plan-out", str(tmp_path / "iterative.json")]) == 0
    iterative = PrunePlan.load(tmp_path / "iterative.json")
    assert iterative.policy["schedule"].startswith("iterative x2") and iterative.policy["mlp"] == "magnitude"
    hidden = model.config.depth * model.config.mlp_hidden
    assert sum(iterative.mlp_widths(model.config)) == hidden - round(0.4 * hidden)


def test_select_prints_the_prune_command_of_an_mlp_configuration():
    from amg.reporting.select import prune_command

    assert prune_command("save0.4:heads:amg+tokens:amg+mlp:taylor") == \
        "amg prune --macs-saving 0.4 --saving-by all --head-policy amg --token-policy amg --mlp-policy taylor " \
        "--out pruned.pt"
    assert prune_command("mlp0.3:random/per-block~s2") == \
        "amg prune --mlp 0.3 --mlp-policy random --allocation per-block --seed 2 --out pruned.pt"


def test_the_mlp_profile_filters_by_mlp_policy_too():
    from amg.benchmark.profiles import PROFILES, build_cases

    taylor = {c.spec.config_id for c in build_cases(PROFILES["mlp"], policies=["taylor", "amg"])}
    assert "save0.4:mlp:taylor" in taylor and "save0.4:heads:amg+tokens:amg+mlp:taylor" in taylor
    assert not any("random" in config or "magnitude" in config or "tome" in config for config in taylor)
