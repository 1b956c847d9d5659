"""The pruned models of one base model and data set: plans, fine-tunings, their accuracy in PyTorch fp32.

Shared by the benchmark suite (which times them) and the accuracy study (which makes and scores
them once, possibly on a cluster: `amg.benchmark.study_run`). Given a study folder, the models
and accuracy come from it and nothing is calibrated or trained: a device measures what the
study made.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from amg.benchmark.plan_store import PlanStore
from amg.benchmark.profiles import UNPRUNED, PruneSpec
from amg.benchmark.query_record import per_query_values
from amg.benchmark.study_folder import StudyFolder
from amg.data.layout import ReIDDataset
from amg.data.synthetic import MANIFEST
from amg.errors import InputError, Unplannable
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan, load_pruned
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages
from amg.pruning.iterative import TrainingSet, run_schedule
from amg.pruning.macs_target import plan_for_saving
from amg.pruning.planner import make_plan
from amg.pruning.schedule import ONE_SHOT
from amg.train.cache import cached_pruned, model_fingerprint
from amg.train.evaluate import Evaluator

Progress = Callable[[str], None]
QUERY_SETS = ("query", "occluded")  # the query sets whose metrics become columns


@dataclass
class PrunedModels:
    model: ReIDViT  # the base model every configuration is pruned from
    dataset: ReIDDataset | None  # None: nothing to calibrate, fine-tune or evaluate on
    progress: Progress
    # Where one-shot plans are reused from and new ones kept (None: plan every run anew).
    plan_store: PlanStore | None = None
    # Where fine-tuned models are cached (None: the user cache's pruned/).
    model_folder: Path | None = None
    # A finished study to take plans, fine-tuned models and accuracy from: nothing is planned or trained.
    study: StudyFolder | None = None
    _pruned: dict[PruneSpec, ReIDViT] = field(default_factory=dict)
    _plans: dict[PruneSpec, PrunePlan | Unplannable] = field(default_factory=dict)
    _training: TrainingSet | None = None
    _fingerprint: str | None = None
    _calibration: CalibrationImages | None = None
    _evaluator: Evaluator | None = None

    def __post_init__(self) -> None:
        if self.study is not None:
            self.study.check_base(self.fingerprint())
            self.plan_store = self.study.plans

    def calibration(self) -> CalibrationImages:
        if self._calibration is None:
            if self.dataset is None:
                raise InputError("AMG and gradient policies need data with labels: pass --amg-data or use a trained model")
            self._calibration = CalibrationImages.from_dataset(self.dataset, self.model.config.img_size,
                                                             progress=self.progress)
        return self._calibration

    @property
    def calibrated(self) -> CalibrationImages | None:
        """The calibration images if something was scored on them, else None."""
        return self._calibration

    def plans_made(self) -> dict[str, PrunePlan]:
        """{config_id: one-shot plan} of every plan made or loaded so far."""
        return {key.config_id: plan for key, plan in self._plans.items() if isinstance(plan, PrunePlan)}

    def fingerprint(self) -> str:
        """The base weights' hash: what stored plans and cached fine-tunings are made for."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def plan(self, spec: PruneSpec) -> PrunePlan:
        """The one-shot plan of `spec` (shared by its schedules); why it cannot be made is remembered too."""
        key = replace(spec.pruning, schedule=ONE_SHOT)
        if key not in self._plans:
            stored = self.plan_store.load(key.config_id, self.model.config, self.fingerprint()) \
                if self.plan_store else None
            if stored is None and self.study is not None:
                raise self.study.missing(spec.pruning.config_id)
            self._plans[key] = stored or self._make_plan(key)
            if self.plan_store and not stored and isinstance(self._plans[key], PrunePlan):
                self.plan_store.save(key.config_id, self._plans[key], self.fingerprint())
        if isinstance(self._plans[key], Unplannable):
            raise self._plans[key]
        return self._plans[key]

    def _make_plan(self, spec: PruneSpec) -> PrunePlan | Unplannable:
        data = self.calibration() if spec.needs_data else None
        self.progress(f"planning {spec.config_id}")
        try:
            if spec.saving:
                return plan_for_saving(self.model, spec.saving, spec.by, spec.head_policy,
                                       spec.token_policy, spec.allocation, data, seed=spec.seed,
                                       mlp_policy=spec.mlp_policy)
            return make_plan(self.model, spec.heads, spec.tokens, spec.head_policy,
                             spec.token_policy, spec.allocation, data, seed=spec.seed, mlp=spec.mlp,
                             mlp_policy=spec.mlp_policy)
        except Unplannable as error:  # out of reach, or a peer library not installed
            return error

    def pruned(self, spec: PruneSpec) -> ReIDViT:
        if spec not in self._pruned:
            if self.study is not None and spec != UNPRUNED:
                self.study.check_member(spec.pruning.config_id)
            if spec.class_token_block:  # the same weights, another forward: a copy of the plain model
                plain = self.pruned(spec.pruning)
                self._pruned[spec] = copy.deepcopy(plain).use_class_token_last_block()
                self._pruned.pop(spec.pruning)  # (rebuilt if asked for: ViT-Base copies take gigabytes)
            elif spec == UNPRUNED:
                self._pruned[spec] = self.model
            elif spec.schedule == ONE_SHOT:
                self._pruned[spec] = apply_plan(copy.deepcopy(self.model), copy.deepcopy(self.plan(spec)))
            elif self.study is not None:
                self._pruned[spec] = load_pruned(self.study.model_path(spec.config_id))
            else:
                self._pruned[spec] = self._trained(spec)
            # a cached fine-tune keeps the feature it was saved with; this run's choice wins
            self._pruned[spec].neck_feat = self.model.neck_feat
            self._pruned[spec].to(next(self.model.parameters()).device)  # a loaded file comes on the CPU
        return self._pruned[spec]

    def release(self) -> None:
        """Let the pruned copies go (plans and loaded data stay): a long-lived worker would
        otherwise hold every model it made."""
        self._pruned = {UNPRUNED: self.model} if UNPRUNED in self._pruned else {}

    def _starting_plan(self, spec: PruneSpec) -> PrunePlan:
        """The one-shot plan a schedule starts from (the unpruned model fine-tuned: none)."""
        return self.plan(spec) if spec.prunes else PrunePlan.unpruned(self.model.config)

    def fine_tuning_key(self, spec: PruneSpec) -> dict[str, Any]:
        """Everything that shapes a fine-tuning, by content (no paths): its cache file's name."""
        return {"base": self.fingerprint(), "plan": self._starting_plan(spec).to_dict(),
                "schedule": spec.schedule.__dict__, "data": self.dataset.identity,
                "calibration": self.calibration().description}

    def _trained(self, spec: PruneSpec) -> ReIDViT:
        """Fine-tuned or iterative: minutes of training, so cached by everything that shapes it."""
        plan = self._starting_plan(spec)

        def train(checkpoint: Path) -> ReIDViT:
            self.progress(f"{spec.schedule.description}: {spec.config_id} (cached afterwards)")
            if self._training is None:
                self._training = TrainingSet.from_dataset(self.dataset, self.model.config.img_size, self.progress)
            return run_schedule(self.model, plan, spec.schedule, self.calibration(), self._training, self.progress,
                                checkpoint=checkpoint)

        return cached_pruned(self.fine_tuning_key(spec), train, self.progress, folder=self.model_folder)

    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.dataset, self.model.config.img_size, self.progress)
        return self._evaluator

    def accuracy(self, spec: PruneSpec, compiled=None, label: str = "pytorch fp32") -> AccuracyResult:
        """Re-ID metrics of `spec`'s model in PyTorch fp32 (from the study when there is one), or of
        what `compiled` (features function, batch) runs of it, labelled `label`."""
        if self.study is not None and compiled is None:
            return self.study.accuracy(spec.pruning.config_id)
        if self.dataset is None:
            raise InputError("accuracy needs a data set: pass --amg-data")
        results = self.evaluator().evaluate(self.pruned(spec), compiled=compiled)
        synthetic = (self.dataset.root / MANIFEST).is_file()  # amg.data.synthetic writes it
        row: dict[str, Any] = {"dataset": "synthetic" if synthetic else self.dataset.name, "accuracy_of": label}
        queries = {}
        for name, metrics in results.items():
            if name in QUERY_SETS:
                values = metrics.as_dict()
                row.update({f"{name}_{k}": values[k] for k in ("rank1", "rank5", "mAP", "mINP")})
                row[f"{name}_unmatched"] = metrics.num_skipped  # left out by the protocol: said, not hidden
                queries[name] = per_query_values(metrics.query_ap, metrics.query_first_rank)
        return AccuracyResult(row, queries)


@dataclass(frozen=True)
class AccuracyResult:
    row: dict[str, Any]  # the CSV columns: data set, what was measured, metrics per query set
    queries: dict[str, dict[str, list]]  # {query set: per-query AP and Rank-1 hits} (`query_record`)
