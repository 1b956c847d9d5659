"""PrunePlan: which heads and key/value positions each block keeps; making, applying, saving.

A plan speaks of the *original* model: head numbers are those of the unpruned block, token
positions those of the unpruned sequence (0 is the class token, always kept). Applying a
plan makes a smaller dense model (physically sliced qkv/proj, static K/V index), never a
masked one. Plans are JSON: they can be read, diffed and applied without calibration data.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from amg import scores as S
from amg.attention import patch_model
from amg.data.layout import ReIDDataset, relabel_pids
from amg.data.preload import preload_images
from amg.dynamic import DYNAMIC_POLICIES, apply_dynamic
from amg.measure.flops import analytic_model_macs, count_macs
from amg.model import ModelConfig, ReIDViT, load_model, save_model

Progress = Callable[[str], None]
PLAN_VERSION = 1


@dataclass
class PrunePlan:
    num_heads: int  # heads per block of the model the plan was made for
    num_tokens: int  # tokens (class token included) of that model
    kept_heads: list[list[int]]  # per block: original head numbers kept
    kept_tokens: list[list[int] | None]  # per block: K/V positions kept, None = all
    policy: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    # EViT / ToMe instead of static K/V pruning: {"policy": "evit"|"tome", "amount": ...}
    dynamic_tokens: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    @classmethod
    def unpruned(cls, config: ModelConfig) -> PrunePlan:
        return cls(config.num_heads, config.num_tokens, [list(range(config.num_heads))] * config.depth,
                   [None] * config.depth, {"heads": "none", "tokens": "none"}, {"heads": 0.0, "tokens": 0.0})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrunePlan:
        try:
            plan = cls(**values)
        except TypeError as error:
            raise ValueError(f"not a PrunePlan: {error}") from error
        if plan.version != PLAN_VERSION:
            raise ValueError(f"plan version {plan.version} is not supported (expected {PLAN_VERSION})")
        return plan

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a JSON plan: {error}") from error

    def check_fits(self, config: ModelConfig) -> None:
        """Raise a ValueError naming the first mismatch between this plan and `config`."""
        problems = []
        if len(self.kept_heads) != config.depth or len(self.kept_tokens) != config.depth:
            problems.append(f"plan has {len(self.kept_heads)} blocks, model has {config.depth}")
        if self.num_heads != config.num_heads:
            problems.append(f"plan is for {self.num_heads} heads per block, model has {config.num_heads}")
        if self.num_tokens != config.num_tokens:
            problems.append(f"plan is for {self.num_tokens} tokens, model has {config.num_tokens}")
        for block, heads in enumerate(self.kept_heads):
            if not heads:
                problems.append(f"block {block} keeps no head (at least one per block must stay)")
            elif min(heads) < 0 or max(heads) >= config.num_heads or len(set(heads)) != len(heads):
                problems.append(f"block {block}: head numbers {heads} are not distinct numbers in [0, {config.num_heads})")
        for block, tokens in enumerate(self.kept_tokens):
            if tokens is None:
                continue
            if 0 not in tokens:
                problems.append(f"block {block}: the class token (position 0) must be kept")
            if min(tokens) < 0 or max(tokens) >= config.num_tokens or len(set(tokens)) != len(tokens):
                problems.append(f"block {block}: K/V positions are not distinct numbers in [0, {config.num_tokens})")
        if self.dynamic_tokens is not None and any(t is not None for t in self.kept_tokens):
            problems.append("a plan has either static K/V positions or a dynamic token policy, not both")
        if problems:
            raise ValueError("plan does not fit the model: " + "; ".join(problems))

    @property
    def heads_kept(self) -> int:
        return sum(len(h) for h in self.kept_heads)


def needs_calibration(heads: bool, head_policy: str, tokens: bool, token_policy: str) -> bool:
    """Whether pruning heads (if `heads`) and tokens (if `tokens`) by these policies scores on data."""
    return (heads and head_policy not in ("random", "magnitude")) or (tokens and token_policy == "amg")


def check_ratio(name: str, ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} ratio must be in [0, 1), got {ratio}")
    return float(ratio)


# ---------------------------------------------------------------------------------- selection


def select_heads(removal_scores: Sequence[torch.Tensor], head_ids: Sequence[Sequence[int]], ratio: float,
                 allocation: str = "global", total_heads: int | None = None) -> list[list[int]]:
    """Kept original head numbers per block after removing `ratio` of all heads.

    `allocation` "per-block" spreads the removals evenly over blocks; any other (global,
    normalized) ranks all heads together.

    `total_heads` (default: the heads now present) is what the ratio is a fraction of, so
    that iterative pruning can aim at a fraction of the original model. Higher score goes
    first; every block keeps at least one head.
    """
    check_ratio("head", ratio)
    present = sum(len(ids) for ids in head_ids)
    total = total_heads or present
    to_remove = round(ratio * total) - (total - present)
    removed = [0] * len(head_ids)
    cap = [len(ids) - 1 for ids in head_ids]  # never empty a block
    remove: set[tuple[int, int]] = set()
    if allocation == "per-block":
        # Each block's whole share first; the remainder of the exact total (a ratio rarely
        # divides a block's heads) goes one extra per block, to the highest-scoring heads.
        share = ratio * total / len(head_ids)
        for block, (score, ids) in enumerate(zip(removal_scores, head_ids)):
            already = round(total / len(head_ids)) - len(ids)
            quota = max(0, min(math.floor(share) - already, cap[block]))
            for position in torch.argsort(score, descending=True)[:quota].tolist():
                remove.add((block, position))
            removed[block] = quota
            cap[block] = min(cap[block], quota + 1)
    order = sorted(((float(s), b, p) for b, score in enumerate(removal_scores) for p, s in enumerate(score)),
                   key=lambda item: (-item[0], item[1], item[2]))
    for _, block, position in order:
        if len(remove) >= to_remove:
            break
        if (block, position) not in remove and removed[block] < cap[block]:
            remove.add((block, position))
            removed[block] += 1
    return [[ids[p] for p in range(len(ids)) if (b, p) not in remove] for b, ids in enumerate(head_ids)]


def select_tokens(keep_scores: Sequence[torch.Tensor], ratio: float, min_keep: int = 1) -> list[list[int] | None]:
    """Kept K/V positions per block after dropping `ratio` of all non-class positions globally.

    Position 0 (class token) is always kept, and every block keeps `min_keep` patch positions.
    """
    check_ratio("token", ratio)
    if ratio == 0:
        return [None] * len(keep_scores)
    candidates = sorted(((float(s), b, p) for b, score in enumerate(keep_scores) for p, s in enumerate(score) if p > 0),
                        key=lambda item: (item[0], item[1], item[2]))
    to_drop = round(ratio * len(candidates))
    left = [len(score) - 1 for score in keep_scores]
    dropped: set[tuple[int, int]] = set()
    for _, block, position in candidates:
        if len(dropped) >= to_drop:
            break
        if left[block] > min_keep:
            dropped.add((block, position))
            left[block] -= 1
    return [[p for p in range(len(score)) if (b, p) not in dropped] for b, score in enumerate(keep_scores)]


def head_removal_scores(model: ReIDViT, policy: str, allocation: str, calibration: S.Calibration | None,
                        seed: int) -> list[torch.Tensor]:
    if policy not in S.HEAD_POLICIES:
        raise ValueError(f"unknown head policy {policy!r}; choose one of {S.HEAD_POLICIES}")
    if policy == "random":
        return S.random_removal_scores([m.num_heads for m in patch_model(model)], seed)
    if policy == "magnitude":
        return S.magnitude_removal_scores(model)
    if calibration is None:
        raise ValueError(f"head policy {policy!r} needs calibration data")
    if policy == "amg":
        return S.amg_head_removal_scores(calibration, allocation)
    if policy == "amg-lowest":
        return S.lowest_entropy_removal_scores(calibration)
    return S.gradient_removal_scores(calibration)


def token_keep_scores(model: ReIDViT, policy: str, calibration: S.Calibration | None, seed: int) -> list[torch.Tensor]:
    if policy not in S.TOKEN_POLICIES:
        raise ValueError(f"unknown static token policy {policy!r}; choose one of {S.TOKEN_POLICIES}")
    if policy == "random":
        return S.random_token_keep_scores([model.config.num_tokens] * model.config.depth, seed)
    if calibration is None:
        raise ValueError("token policy 'amg' needs calibration data")
    return S.amg_token_keep_scores(calibration)


@dataclass
class CalibrationData:
    """uint8 images (+ training labels and camera ids) used to score heads and tokens."""

    images: torch.Tensor
    labels: list[int] | None = None
    camids: list[int] | None = None
    description: dict[str, Any] = field(default_factory=dict)
    loss: str = "id"
    teacher: ReIDViT | None = None

    @classmethod
    def from_dataset(cls, dataset: ReIDDataset, img_size: tuple[int, int], count: int = 256, seed: int = 0,
                     progress: Progress | None = None) -> CalibrationData:
        """`count` random training images (by `seed`) with their contiguous training labels."""
        labels, _ = relabel_pids(dataset.train)
        count = min(count, len(dataset.train))
        chosen = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        samples = [dataset.train[i] for i in chosen]
        if progress:
            progress(f"loading {count} calibration images from {dataset.root}")
        return cls(preload_images(samples, img_size), [labels[i] for i in chosen], [s.camid for s in samples],
                   {"dataset": str(dataset.root), "split": "train", "images": count, "seed": seed, "loss": "id"})

    def run(self, model: ReIDViT, progress: Progress | None, gradients: bool = True) -> S.Calibration:
        return S.calibrate(model, self.images, self.labels, self.camids, self.loss, self.teacher,
                           gradients=gradients, progress=progress)


def make_plan(model: ReIDViT, heads: float = 0.0, tokens: float = 0.0, head_policy: str = "amg",
              token_policy: str = "amg", allocation: str = "global", data: CalibrationData | None = None,
              seed: int = 0, progress: Progress | None = None,
              calibration: S.Calibration | None = None) -> PrunePlan:
    """Score and select: heads first, then tokens scored on the head-pruned model (as the reference).

    `calibration`, if given, is a calibration of `model` as it is now (e.g. from a ratio
    search), reused instead of running `data` through the model again before heads go.
    """
    check_ratio("head", heads)
    check_ratio("token", tokens)
    if allocation not in S.HEAD_ALLOCATIONS:
        raise ValueError(f"unknown head allocation {allocation!r}; choose one of {S.HEAD_ALLOCATIONS}")
    work = copy.deepcopy(model)
    modules = patch_model(work)
    needs_data = needs_calibration(heads > 0, head_policy, tokens > 0, token_policy)
    if needs_data and data is None:
        raise ValueError("this plan needs calibration data (policy 'amg' or 'gradient')")
    if token_policy not in S.TOKEN_POLICIES + DYNAMIC_POLICIES:
        raise ValueError(f"unknown token policy {token_policy!r}; choose one of {S.TOKEN_POLICIES + DYNAMIC_POLICIES}")
    plan = PrunePlan.unpruned(work.config)
    # Start from what the model already is (iterative pruning calls this on pruned models).
    plan.kept_heads = [list(m.head_ids) for m in modules]
    plan.kept_tokens = [None if m.kv_index is None else m.kv_index.tolist() for m in modules]
    plan.policy = {"heads": head_policy if heads else "none", "tokens": token_policy if tokens else "none",
                   "allocation": allocation}
    plan.ratios = {"heads": heads, "tokens": tokens}
    plan.calibration = dict(data.description) if data is not None and needs_data else {}
    if heads > 0:
        if calibration is None and head_policy not in ("random", "magnitude"):
            # entropy needs the maps only, no backward pass
            calibration = data.run(work, progress, gradients=head_policy == "gradient")
        scores = head_removal_scores(work, head_policy, allocation, calibration, seed)
        plan.kept_heads = select_heads(scores, [m.head_ids for m in modules], heads, allocation,
                                       total_heads=work.config.depth * work.config.num_heads)
        apply_plan(work, plan)
        calibration = None  # it described the model before its heads went
    if tokens > 0 and token_policy in DYNAMIC_POLICIES:
        plan.dynamic_tokens = dynamic_amount(token_policy, tokens, work.config)
    elif tokens > 0:
        if token_policy == "amg" and (calibration is None or calibration.token_taylor is None):
            calibration = data.run(work, progress)
        plan.kept_tokens = select_tokens(token_keep_scores(work, token_policy, calibration, seed), tokens)
    return plan


def dynamic_amount(policy: str, ratio: float, config: ModelConfig) -> dict[str, Any]:
    """A token ratio in dynamic terms: EViT keeps 1 - ratio of the tokens at each of its
    reduction blocks; ToMe merges ratio x patches / depth tokens in every block."""
    if policy == "evit":
        return {"policy": "evit", "amount": round(1.0 - ratio, 4)}
    return {"policy": "tome", "amount": max(1, round(ratio * (config.num_tokens - 1) / config.depth))}


def plan_macs(config: ModelConfig, plan: PrunePlan) -> int:
    """Analytic per-image MACs of the blocks under `plan` (instant; fvcore confirms the final plan)."""
    return analytic_model_macs(
        config.num_tokens, config.embed_dim, config.embed_dim // config.num_heads,
        int(config.embed_dim * config.mlp_ratio), [len(h) for h in plan.kept_heads],
        [config.num_tokens if t is None else len(t) for t in plan.kept_tokens],
    )


MAX_SEARCH_RATIO = 0.95


class OutOfReach(ValueError):
    """A MACs saving that a pruning mode cannot reach on this model (not a bug: a limit)."""


def plan_for_saving(model: ReIDViT, target: float, mode: str = "both", head_policy: str = "amg",
                    token_policy: str = "amg", allocation: str = "global", data: CalibrationData | None = None,
                    seed: int = 0, progress: Progress | None = None) -> PrunePlan:
    """A plan removing about `target` of the model's fvcore MACs, by heads, tokens or both (equal ratios).

    Static plans: the ratio is found by bisection on the analytic block count plus the fixed
    rest of the model (patch embedding, neck), with scores from one calibration of the
    unpruned model; the returned plan is then made properly by `make_plan` (tokens scored on
    the head-pruned model), so its measured saving can differ slightly from `target`.
    Dynamic token policies (EViT, ToMe; mode "tokens" only) are searched on fvcore's count
    of the patched model; ToMe's whole r per block gives the nearest reachable saving.
    Raises OutOfReach when the mode cannot save `target` on this model.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target MACs saving must be in (0, 1), got {target}")
    if mode not in ("heads", "tokens", "both"):
        raise ValueError(f"mode must be heads, tokens or both, got {mode!r}")
    use_heads, use_tokens = mode in ("heads", "both"), mode in ("tokens", "both")
    if use_tokens and token_policy in DYNAMIC_POLICIES:
        if use_heads:
            raise ValueError("a MACs target with a dynamic token policy is searched by tokens alone (mode 'tokens')")
        return _dynamic_plan_for_saving(model, target, token_policy)
    work = copy.deepcopy(model)
    modules = patch_model(work)
    needs_data = needs_calibration(use_heads, head_policy, use_tokens, token_policy)
    if needs_data and data is None:
        raise ValueError("this plan needs calibration data (policy 'amg' or 'gradient')")
    calibration = data.run(work, progress, gradients=use_tokens or head_policy == "gradient") if needs_data else None
    head_scores = head_removal_scores(work, head_policy, allocation, calibration, seed) if use_heads else None
    token_scores = token_keep_scores(work, token_policy, calibration, seed) if use_tokens else None
    blocks = plan_macs(work.config, PrunePlan.unpruned(work.config))
    rest = count_macs(work).total - blocks  # what no plan changes: patch embedding, norms, neck
    candidate = PrunePlan.unpruned(work.config)

    def saving(ratio: float) -> float:
        if head_scores is not None:
            candidate.kept_heads = select_heads(head_scores, [m.head_ids for m in modules], ratio, allocation)
        if token_scores is not None:
            candidate.kept_tokens = select_tokens(token_scores, ratio)
        return 1 - (rest + plan_macs(work.config, candidate)) / (rest + blocks)

    reachable = saving(MAX_SEARCH_RATIO)
    if reachable < target:
        raise OutOfReach(f"a {target:.0%} MACs saving is out of reach by {mode}: at ratio {MAX_SEARCH_RATIO} "
                         f"the saving is {reachable:.1%}")
    low, high = 0.0, MAX_SEARCH_RATIO
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if saving(middle) < target else (low, middle)
    plan = make_plan(model, heads=high if use_heads else 0.0, tokens=high if use_tokens else 0.0,
                     head_policy=head_policy, token_policy=token_policy, allocation=allocation, data=data,
                     seed=seed, progress=progress, calibration=calibration)
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


def apply_plan(model: ReIDViT, plan: PrunePlan) -> ReIDViT:
    """Prune `model` in place to `plan` (it may already be pruned to a superset of the plan)."""
    plan.check_fits(model.config)
    for module, heads, tokens in zip(patch_model(model), plan.kept_heads, plan.kept_tokens):
        if sorted(heads) != sorted(module.head_ids):
            module.keep_heads(heads)
        module.keep_tokens(tokens, model.config.num_tokens)
    if plan.dynamic_tokens is not None:
        apply_dynamic(model, plan.dynamic_tokens["policy"], plan.dynamic_tokens["amount"],
                      plan.dynamic_tokens.get("blocks"))
    model.plan = plan
    return model


def current_plan(model: ReIDViT) -> PrunePlan:
    return getattr(model, "plan", None) or PrunePlan.unpruned(model.config)


# ------------------------------------------------------------------------------ save and load


def save_pruned(model: ReIDViT, path: str | Path, **meta: Any) -> Path:
    """An amg model file with the plan inside; `load_pruned` rebuilds the shapes from it."""
    return save_model(model, path, extra={"plan": current_plan(model).to_dict()}, **meta)


def _apply_saved_plan(model: ReIDViT, payload: dict[str, Any]) -> None:
    if payload.get("plan") is not None:
        apply_plan(model, PrunePlan.from_dict(payload["plan"]))


def load_pruned(path: str | Path) -> ReIDViT:
    """Load any amg model file, pruned (with a plan) or not, in eval mode."""
    return load_model(path, prepare=_apply_saved_plan)
