"""Plans by MACs target: the pruning ratio (or EViT keep rate / ToMe r) that saves a given
fraction of the whole model's fvcore MACs, or `OutOfReach` with the reachable maximum."""

from __future__ import annotations

import copy
import math

from amg.errors import InputError, OutOfReach
from amg.measure.flops import count_macs, plan_macs
from amg.model.attention import patch_model
from amg.model.config import ModelConfig
from amg.model.dynamic import apply_dynamic
from amg.model.mlp import channel_ids_per_block
from amg.model.plan import PrunePlan
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages, Progress
from amg.pruning.peer import peer_plan_for_saving
from amg.pruning.planner import channel_keep_scores, head_removal_scores, make_plan, token_keep_scores
from amg.pruning.policies import (
    SAVING_MODES,
    axis_policies,
    is_dynamic,
    needs_calibration,
    needs_gradients,
    peer_policy,
)
from amg.pruning.ratio_search import plan_saving, smallest_ratio
from amg.pruning.selection import select_channels, select_heads, select_tokens
from amg.train.distributed import from_main

MAX_SEARCH_RATIO = 0.95


def reachable_savings(config: ModelConfig) -> dict[str, float]:
    """The most of the whole model's fvcore MACs each static mode can remove (the limit of
    ratios near 1): heads by the reference's `global` allocation (one head left in the model)
    and by `keep-one` (one per block), tokens (one patch position per block), and both."""
    unpruned = PrunePlan.unpruned(config)
    blocks = plan_macs(config, unpruned)
    total = count_macs(ReIDViT(config).eval()).total
    one_head_in_model = [[0]] + [[] for _ in range(config.depth - 1)]
    one_head_per_block = [[0] for _ in range(config.depth)]
    one_patch_per_block = [[0, 1] for _ in range(config.depth)]
    limits = {
        "heads (global)": (one_head_in_model, unpruned.kept_tokens),
        "heads (keep-one)": (one_head_per_block, unpruned.kept_tokens),
        "tokens": (unpruned.kept_heads, one_patch_per_block),
        "heads (global) + tokens": (one_head_in_model, [one_patch_per_block[0]] + [None] * (config.depth - 1)),
        "heads (keep-one) + tokens": (one_head_per_block, one_patch_per_block),
    }
    savings = {}
    for mode, (heads, tokens) in limits.items():
        plan = PrunePlan(config.num_heads, config.num_tokens, heads, tokens)
        savings[mode] = (blocks - plan_macs(config, plan)) / total
    one_channel = [[0] for _ in range(config.depth)]
    for mode, (heads, tokens) in {"mlp": (unpruned.kept_heads, unpruned.kept_tokens),
                                  "heads (global) + tokens + mlp": limits["heads (global) + tokens"]}.items():
        plan = PrunePlan(config.num_heads, config.num_tokens, heads, tokens, kept_mlp=one_channel)
        savings[mode] = (blocks - plan_macs(config, plan)) / total
    return savings


def plan_for_saving(model: ReIDViT, target: float, mode: str = "both", head_policy: str = "amg",
                    token_policy: str = "amg", allocation: str = "global", data: CalibrationImages | None = None,
                    seed: int = 0, progress: Progress | None = None, mlp_policy: str = "taylor",
                    mlp_multiple: int = 1) -> PrunePlan:
    """A plan removing about `target` of the model's fvcore MACs by a `SAVING_MODES` mode:
    heads, tokens, both, MLP channels or all three (equal ratios).

    Static plans: the ratio is found by bisection on the analytic block count plus the fixed
    rest of the model (patch embedding, neck), with scores from one calibration of the
    unpruned model; the returned plan is then made properly by `make_plan` (tokens scored on
    the head-pruned model), so its measured saving can differ slightly from `target`.
    Dynamic token policies (EViT, ToMe; mode "tokens" only) are searched on fvcore's count
    of the patched model; ToMe's whole r per block gives the nearest reachable saving.
    Raises OutOfReach when the mode cannot save `target` on this model.
    """
    if not 0.0 < target < 1.0:
        raise InputError(f"target MACs saving must be in (0, 1), got {target}")
    if mode not in SAVING_MODES:
        raise InputError(f"mode must be one of {', '.join(SAVING_MODES)}, got {mode!r}")
    use_heads, use_tokens, use_mlp = (axis in SAVING_MODES[mode] for axis in ("heads", "tokens", "mlp"))
    peer = peer_policy(axis_policies(use_heads, head_policy, use_tokens, token_policy, use_mlp, mlp_policy))
    if peer:
        return from_main(peer_plan_for_saving(model, target, peer, data, progress, heads=use_heads, mlp=use_mlp))
    if use_tokens and is_dynamic(token_policy):
        if use_heads or use_mlp:
            raise InputError("a MACs target with a dynamic token policy is searched by tokens alone (mode 'tokens')")
        return _dynamic_plan_for_saving(model, target, token_policy)
    work = copy.deepcopy(model)
    modules = patch_model(work)
    needs_data = needs_calibration(use_heads, head_policy, use_tokens, token_policy, use_mlp, mlp_policy)
    if needs_data and data is None:
        raise InputError(f"this plan needs calibration data (head policy {head_policy!r}, token policy "
                         f"{token_policy!r}, MLP policy {mlp_policy!r})")
    gradients = needs_gradients(use_heads, head_policy, use_tokens, token_policy, use_mlp, mlp_policy)
    calibration = data.run(work, progress, gradients=gradients, mlp=use_mlp) if needs_data else None
    head_scores = head_removal_scores(work, head_policy, allocation, calibration, seed) if use_heads else None
    token_scores = token_keep_scores(work, token_policy, calibration, seed) if use_tokens else None
    mlp_scores = channel_keep_scores(work, mlp_policy, allocation, calibration, seed) if use_mlp else None
    channel_ids = channel_ids_per_block(work)
    total_channels = work.config.depth * work.config.mlp_hidden  # as make_plan counts the ratio
    saving_of = plan_saving(work)
    candidate = PrunePlan.unpruned(work.config)

    def saving(ratio: float) -> float:
        if head_scores is not None:
            candidate.kept_heads = select_heads(head_scores, [m.head_ids for m in modules], ratio, allocation)
        if token_scores is not None:
            candidate.kept_tokens = select_tokens(token_scores, ratio)
        if mlp_scores is not None:
            candidate.kept_mlp = select_channels(mlp_scores, channel_ids, ratio, allocation, total_channels,
                                                 mlp_multiple)
        return saving_of(candidate)

    high = smallest_ratio(saving, target, mode, MAX_SEARCH_RATIO, steps=30)
    plan = make_plan(model, heads=high if use_heads else 0.0, tokens=high if use_tokens else 0.0,
                     head_policy=head_policy, token_policy=token_policy, allocation=allocation, data=data,
                     seed=seed, progress=progress, calibration=calibration, mlp=high if use_mlp else 0.0,
                     mlp_policy=mlp_policy, mlp_multiple=mlp_multiple)
    plan.ratios["target_macs_saving"] = target
    return plan


# ToMe's savings come in steps of one merged token per block; a step further than this from
# the target is reported as out of reach rather than silently compared at another saving.
DYNAMIC_SAVING_TOLERANCE = 0.05


def _dynamic_plan_for_saving(model: ReIDViT, target: float, policy: str) -> PrunePlan:
    full = count_macs(model).total
    patches = model.config.num_tokens - 1

    def saving(amount: float) -> float:
        patched = apply_dynamic(copy.deepcopy(model), policy, amount)
        return 1 - count_macs(patched).total / full

    if policy == "tome":
        # r above half of what is left merges nothing more (bipartite halves); stop when a step adds nothing
        best, best_gap, previous = None, math.inf, -1.0
        for r in range(1, patches // 2 + 1):
            value = saving(r)
            if abs(value - target) < best_gap:
                best, best_gap = r, abs(value - target)
            if value >= target or value <= previous:
                break
            previous = value
        amount: float = best
    else:  # EViT: the keep rate; a lower rate saves more
        low, high = 1.0 / patches, 1.0 - 1.0 / patches
        if saving(low) < target:
            raise OutOfReach(f"a {target:.0%} MACs saving is out of reach by EViT: keeping one token in "
                             f"{patches} saves {saving(low):.1%}")
        for _ in range(14):
            middle = (low + high) / 2
            low, high = (middle, high) if saving(middle) >= target else (low, middle)
        amount, best_gap = round(low, 4), abs(saving(round(low, 4)) - target)
    if best_gap > DYNAMIC_SAVING_TOLERANCE:
        raise OutOfReach(f"a {target:.0%} MACs saving is out of reach by {policy}: the nearest setting "
                         f"({amount}) is {best_gap:.1%} away")
    plan = PrunePlan.unpruned(model.config)
    plan.policy = {"heads": "none", "tokens": policy, "allocation": "global"}
    # the token ratio that `dynamic_amount` turns into this amount
    ratio = 1.0 - amount if policy == "evit" else amount * model.config.depth / patches
    plan.ratios = {"heads": 0.0, "tokens": round(ratio, 4), "target_macs_saving": target}
    plan.dynamic_tokens = {"policy": policy, "amount": amount}
    return plan


