"""Iterative pruning: remove a few heads, fine-tune briefly with distillation, re-score, repeat.

The reference removes 67% of LA-Tiny's heads in 24 small steps with an epoch of fine-tuning
between them; here the number of rounds and the fine-tuning steps per round are parameters.
Heads go first over the rounds; key/value tokens are then scored once on the head-pruned,
fine-tuned model and removed, followed by a fine-tuning round; MLP channels likewise, last.
The teacher throughout is the unpruned model (soft distillation, `TrainConfig.distill_alpha`
/ `distill_tau`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from amg.data.layout import ReIDDataset, relabel_pids
from amg.data.preload import preload_images
from amg.errors import InputError
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages, Progress
from amg.pruning.planner import make_plan
from amg.pruning.policies import HEAD_POLICIES
from amg.pruning.schedule import Schedule, fine_tuning_stages
from amg.train.config import TrainConfig
from amg.train.reid_training import train_reid


@dataclass(frozen=True)
class IterativeConfig:
    rounds: int = 4  # head-pruning rounds
    finetune_steps: int = 60  # fine-tuning steps after each round (and after the token step)
    finetune_lr: float = 2e-4

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.finetune_steps < 0:
            raise InputError("rounds must be >= 1 and finetune_steps >= 0")


@dataclass
class TrainingSet:
    """Preloaded uint8 training images with contiguous labels (the model's classifier ids)."""

    images: torch.Tensor
    labels: list[int]
    camids: list[int]

    @classmethod
    def from_dataset(cls, dataset: ReIDDataset, img_size: tuple[int, int],
                     progress: Progress | None = None) -> TrainingSet:
        """The whole training split, labelled as `relabel_pids` numbers it (as training did)."""
        labels, _ = relabel_pids(dataset.train)
        if progress:
            progress(f"loading {len(dataset.train)} training images for fine-tuning")
        return cls(preload_images(dataset.train, img_size), labels, [s.camid for s in dataset.train])


def finetune_distilled(model: ReIDViT, teacher: ReIDViT, data: TrainingSet, steps: int, config: IterativeConfig,
                       base: TrainConfig = TrainConfig(), progress: Progress | None = None,
                       checkpoint: Path | None = None) -> None:
    if steps == 0:
        return
    # a small data set may hold fewer identities than a default PK batch asks for
    identities = min(base.num_identities, len(set(data.labels)))
    recipe = dataclasses.replace(base, steps=steps, lr=config.finetune_lr, warmup_steps=min(10, steps),
                                 log_every=max(1, steps // 3), num_identities=identities)
    train_reid(model, data.images, data.labels, data.camids, recipe, progress, teacher=teacher, checkpoint=checkpoint)


def iterative_prune(model: ReIDViT, heads: float, tokens: float, calibration: CalibrationImages,
                    training: TrainingSet, config: IterativeConfig = IterativeConfig(),
                    head_policy: str = "amg", token_policy: str = "amg", allocation: str = "global",
                    base: TrainConfig = TrainConfig(), seed: int = 0,
                    progress: Progress | None = None, mlp: float = 0.0,
                    mlp_policy: str = "taylor") -> tuple[ReIDViT, PrunePlan]:
    """A pruned, fine-tuned copy of `model` and its plan; `model` itself is left untouched."""
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    plan = None
    for round_index in range(1, config.rounds + 1 if heads > 0 else 1):
        ratio = heads * round_index / config.rounds
        if progress:
            progress(f"round {round_index}/{config.rounds}: heads to {ratio:.0%} removed")
        plan = make_plan(student, heads=ratio, head_policy=head_policy, allocation=allocation,
                         data=calibration, seed=seed + round_index, progress=progress)
        apply_plan(student, plan)
        finetune_distilled(student, teacher, training, config.finetune_steps, config, base, progress)
    if tokens > 0:
        if progress:
            progress(f"tokens: {tokens:.0%} of key/value positions removed")
        plan = make_plan(student, tokens=tokens, token_policy=token_policy, data=calibration, seed=seed,
                         progress=progress)
        apply_plan(student, plan)
        finetune_distilled(student, teacher, training, config.finetune_steps, config, base, progress)
    if mlp > 0:
        if progress:
            progress(f"MLP channels: {mlp:.0%} removed")
        plan = make_plan(student, mlp=mlp, mlp_policy=mlp_policy, allocation=allocation, data=calibration,
                         seed=seed, progress=progress)
        apply_plan(student, plan)
        finetune_distilled(student, teacher, training, config.finetune_steps, config, base, progress)
    plan = plan or PrunePlan.unpruned(model.config)
    plan.policy = {"heads": head_policy if heads else "none", "tokens": token_policy if tokens else "none",
                   "allocation": allocation,
                   "schedule": f"iterative x{config.rounds}, {config.finetune_steps} fine-tune steps, distilled"}
    plan.ratios = {"heads": heads, "tokens": tokens}
    if mlp > 0:
        plan.policy["mlp"], plan.ratios["mlp"] = mlp_policy, mlp
    student.plan = plan
    return student.eval(), plan


def run_schedule(model: ReIDViT, plan: PrunePlan, schedule: Schedule, calibration: CalibrationImages | None,
                 training: TrainingSet | None, progress: Progress | None = None,
                 checkpoint: Path | None = None) -> ReIDViT:
    """A pruned copy of `model` (left untouched) by `schedule`, starting from the one-shot `plan`.

    `checkpoint`: where the fine-tuning of the `finetune` schedule keeps its state and resumes
    from (iterative schedules re-score between stages and start over when interrupted).

    Iterative re-scores with `plan`'s policies and ratios; a plan with dynamic tokens (EViT,
    ToMe) has nothing to re-score and is fine-tuned once instead (its description says so).
    """
    if schedule.kind != "one-shot" and training is None:
        raise InputError(f"the {schedule.kind} schedule needs training data")
    peer = [name for name in plan.policy.values() if name in HEAD_POLICIES and HEAD_POLICIES[name].peer]
    if schedule.kind == "iterative" and peer:
        raise InputError(f"{peer[0]} plans start from the unpruned model, so it cannot re-score between rounds: "
                         "fine-tune its plan (the finetune schedule)")
    if schedule.kind == "iterative" and plan.dynamic_tokens is None:
        if calibration is None:
            raise InputError("the iterative schedule needs calibration data to re-score")
        ratios = plan.ratios
        stages = fine_tuning_stages(schedule.rounds, bool(ratios.get("heads")), bool(ratios.get("tokens")),
                                    bool(ratios.get("mlp")))
        per_stage = max(1, schedule.steps // stages)
        pruned, new_plan = iterative_prune(
            model, ratios.get("heads", 0.0), ratios.get("tokens", 0.0), calibration, training,
            IterativeConfig(schedule.rounds, per_stage, schedule.lr), plan.policy.get("heads", "amg"),
            plan.policy.get("tokens", "amg"), plan.policy.get("allocation", "global"), progress=progress,
            mlp=ratios.get("mlp", 0.0), mlp_policy=plan.policy.get("mlp", "taylor"))
        new_plan.ratios = dict(plan.ratios)
        new_plan.policy["schedule"] = schedule.description
        return pruned
    pruned = apply_plan(copy.deepcopy(model), copy.deepcopy(plan))
    if schedule.kind != "one-shot":
        teacher = copy.deepcopy(model).eval()
        finetune_distilled(pruned, teacher, training, schedule.steps, IterativeConfig(1, schedule.steps, schedule.lr),
                           progress=progress, checkpoint=checkpoint)
        pruned.plan.policy["schedule"] = schedule.description
    return pruned.eval()
