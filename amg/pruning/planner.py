"""Making a plan: score heads and key/value positions by a policy, then select what stays."""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

from amg.errors import InputError
from amg.model.attention import patch_model
from amg.model.config import ModelConfig
from amg.model.mlp import channel_ids_per_block
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan
from amg.model.vit import ReIDViT
from amg.pruning import scores as S
from amg.pruning.calibration import CalibrationImages, Progress
from amg.pruning.peer import peer_plan
from amg.pruning.policies import (
    HEAD_ALLOCATIONS,
    HEAD_POLICIES,
    HEADS,
    MLP,
    MLP_POLICIES,
    TOKEN_POLICIES,
    TOKENS,
    Policy,
    axis_policies,
    needs_calibration,
    peer_policy,
    policy,
)
from amg.pruning.selection import check_channels_removed, check_ratio, select_channels, select_heads, select_tokens
from amg.train.distributed import from_main


def resolve_scorers(policies: Iterable[Policy]) -> dict[str, Callable]:
    """The scorer functions the torch-free registry names, from `amg.pruning.scores`: resolved at
    import of this module, so that a renamed or misspelt scorer fails at once, not at its first use."""
    named = {p.scorer for p in policies if p.scorer}
    missing = sorted(name for name in named if not callable(getattr(S, name, None)))
    if missing:
        raise ImportError(f"amg.pruning.policies names scorers amg.pruning.scores does not have: {missing}")
    return {name: getattr(S, name) for name in named}


_SCORERS = resolve_scorers([*HEAD_POLICIES.values(), *TOKEN_POLICIES.values(), *MLP_POLICIES.values()])


def policy_scores(axis: str, model: ReIDViT, name: str, allocation: str, calibration: S.CalibrationStats | None,
                  seed: int) -> list[torch.Tensor]:
    """The registered scorer of policy `name` on `axis` (heads: higher goes; tokens: higher stays)."""
    chosen = policy(axis, name)
    if chosen.dynamic:
        raise InputError(f"token policy {name!r} is dynamic: its blocks choose tokens at run time, nothing is scored")
    if chosen.needs_data and calibration is None:
        raise InputError(f"{axis[:-1]} policy {name!r} needs calibration data")
    return _SCORERS[chosen.scorer](model, calibration, allocation, seed)


def head_removal_scores(model: ReIDViT, name: str, allocation: str, calibration: S.CalibrationStats | None,
                        seed: int) -> list[torch.Tensor]:
    return policy_scores(HEADS, model, name, allocation, calibration, seed)


def token_keep_scores(model: ReIDViT, name: str, calibration: S.CalibrationStats | None, seed: int) -> list[torch.Tensor]:
    return policy_scores(TOKENS, model, name, "global", calibration, seed)


def channel_keep_scores(model: ReIDViT, name: str, allocation: str, calibration: S.CalibrationStats | None,
                        seed: int) -> list[torch.Tensor]:
    return policy_scores(MLP, model, name, allocation, calibration, seed)


def make_plan(model: ReIDViT, heads: float = 0.0, tokens: float = 0.0, head_policy: str = "amg",
              token_policy: str = "amg", allocation: str = "global", data: CalibrationImages | None = None,
              seed: int = 0, progress: Progress | None = None,
              calibration: S.CalibrationStats | None = None, mlp: float = 0.0, mlp_policy: str = "taylor",
              mlp_multiple: int = 1) -> PrunePlan:
    """Score and select: heads first, then tokens scored on the head-pruned model (as the
    reference), then MLP channels (`mlp` of them, rounded per block to `mlp_multiple`) scored
    on the model with its heads and tokens pruned.

    `calibration`, if given, is a calibration of `model` as it is now (e.g. from a ratio
    search), reused instead of running `data` through the model again before heads go.
    """
    check_ratio("head", heads)
    check_ratio("token", tokens)
    check_ratio("MLP channel", mlp)
    peer = peer_policy(axis_policies(heads > 0, head_policy, tokens > 0, token_policy, mlp > 0, mlp_policy))
    if peer:
        return from_main(peer_plan(model, heads, mlp, peer, data, progress))
    mlp_scoring = policy(MLP, mlp_policy) if mlp > 0 else None
    # Only the axes being pruned need a valid policy (`--policy tome` prunes tokens only).
    head_scoring = policy(HEADS, head_policy) if heads > 0 else None
    token_scoring = policy(TOKENS, token_policy) if tokens > 0 else None
    if allocation not in HEAD_ALLOCATIONS:
        raise InputError(f"unknown head allocation {allocation!r}; choose one of {HEAD_ALLOCATIONS}")
    work = copy.deepcopy(model)
    modules = patch_model(work)
    needs_data = needs_calibration(heads > 0, head_policy, tokens > 0, token_policy, mlp > 0, mlp_policy)
    if needs_data and data is None:
        raise InputError(f"this plan needs calibration data (head policy {head_policy!r}, token policy "
                         f"{token_policy!r}, MLP policy {mlp_policy!r})")
    if data is not None and needs_data:  # the reference distils from the model before any head went
        data = data.with_teacher(model)
    plan = PrunePlan.unpruned(work.config)
    # Start from what the model already is (iterative pruning calls this on pruned models).
    plan.kept_heads = [list(m.head_ids) for m in modules]
    plan.kept_tokens = [None if m.kv_index is None else m.kv_index.tolist() for m in modules]
    plan.kept_mlp = _current_channels(work)
    plan.policy = {"heads": head_policy if heads else "none", "tokens": token_policy if tokens else "none",
                   "allocation": allocation}
    plan.ratios = {"heads": heads, "tokens": tokens}
    if mlp > 0:
        plan.policy["mlp"] = mlp_policy
        plan.ratios["mlp"] = mlp
    plan.calibration = dict(data.description) if data is not None and needs_data else {}
    if heads > 0:
        if calibration is None and head_scoring.needs_data:
            calibration = data.run(work, progress, gradients=head_scoring.gradients)
        scores = head_removal_scores(work, head_policy, allocation, calibration, seed)
        plan.kept_heads = select_heads(scores, [m.head_ids for m in modules], heads, allocation,
                                       total_heads=work.config.depth * work.config.num_heads)
        # an emptied block has no keys or values left to keep
        plan.kept_tokens = [t if h else None for h, t in zip(plan.kept_heads, plan.kept_tokens)]
        apply_plan(work, plan)
        calibration = None  # it described the model before its heads went
    if tokens > 0 and token_scoring.dynamic:
        plan.dynamic_tokens = dynamic_amount(token_policy, tokens, work.config)
    elif tokens > 0:
        if token_scoring.needs_data and (calibration is None or calibration.token_taylor is None):
            calibration = data.run(work, progress, gradients=token_scoring.gradients)
        scores = token_keep_scores(work, token_policy, calibration, seed)
        plan.kept_tokens = select_tokens([s if m.num_heads else None for s, m in zip(scores, modules)], tokens)
    if tokens > 0:
        calibration = None  # it described the model before its tokens went
    if mlp > 0:
        apply_plan(work, plan)
        if mlp_scoring.needs_data and (calibration is None or calibration.mlp_taylor is None):
            calibration = data.run(work, progress, gradients=True, mlp=True)
        scores = channel_keep_scores(work, mlp_policy, allocation, calibration, seed)
        channel_ids = channel_ids_per_block(work)
        plan.kept_mlp = select_channels(scores, channel_ids, mlp, allocation,
                                        total_channels=work.config.depth * work.config.mlp_hidden,
                                        multiple=mlp_multiple)
        check_channels_removed(plan.kept_mlp, channel_ids, mlp, mlp_multiple)
        plan.ratios["mlp_multiple"] = mlp_multiple
    return from_main(plan)  # under torchrun, every process prunes to rank 0's plan


def check_plan_removes(before: PrunePlan, after: PrunePlan) -> None:
    """Refuse a plan that says it removes heads or K/V positions and removes none (a ratio that
    rounds to nothing on this model): it would be measured and reported under its ratio. For a
    whole plan (`amg prune`), not for an iterative round or a ratio search's probe."""
    def kept_positions(plan: PrunePlan) -> int:
        return sum(plan.num_tokens if kept is None else len(kept) for kept in plan.kept_tokens)

    for axis, unchanged in (("heads", after.heads_kept == before.heads_kept),
                            ("tokens", after.dynamic_tokens is None and kept_positions(after) == kept_positions(before))):
        ratio = after.ratios.get(axis, 0)
        if ratio > 0 and unchanged:
            raise InputError(f"a {axis[:-1]} ratio of {ratio:g} removes no {axis[:-1]} of this model (it rounds to "
                             f"none): the plan would say {ratio:g} and prune nothing; give a larger ratio")


def _current_channels(model: ReIDViT) -> list[list[int] | None] | None:
    """The model's MLP channels as a plan states them (None: no block's MLP is pruned)."""
    kept = channel_ids_per_block(model)
    full = [list(range(model.config.mlp_hidden))] * len(kept)
    return None if kept == full else [None if k == f else k for k, f in zip(kept, full)]


def dynamic_amount(policy: str, ratio: float, config: ModelConfig) -> dict[str, Any]:
    """A token ratio in dynamic terms: EViT keeps 1 - ratio of the tokens at each of its
    reduction blocks; ToMe merges ratio x patches / depth tokens in every block."""
    if policy == "evit":
        return {"policy": "evit", "amount": round(1.0 - ratio, 4)}
    return {"policy": "tome", "amount": max(1, round(ratio * (config.num_tokens - 1) / config.depth))}


