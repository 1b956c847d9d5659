"""What `pytest bench/` measures: profiles, cases, and one CSV row per case.

bench/ only turns `Case`s into pytest parameters and hands the timing loop to
pytest-benchmark; everything else (pruning, runners, memory, accuracy, the row) is here.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import platform
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import amg
from amg.data.layout import ReIDDataset
from amg.data.synthetic import MANIFEST
from amg.evaluate import Evaluator
from amg.measure.backends import Runner, device_id, device_name, prepare
from amg.measure.flops import count_macs
from amg.measure.latency import LatencyStats, paired_speedup
from amg.measure.memory import measure_peak_memory
from amg.model import ReIDViT
from amg.iterative import TrainingSet
from amg.prune import (CalibrationData, OutOfReach, PrunePlan, apply_plan, current_plan, make_plan, plan_for_saving,
                       save_pruned)
from amg.schedule import ONE_SHOT, Schedule, run_schedule
from amg.zoo import cached_pruned, model_fingerprint

Progress = Callable[[str], None]
# Peak memory is measured where the child process runs the model as deployed; the export
# backends' children would mostly measure the exporter, so their memory is left unmeasured.
TORCH_BACKENDS = ("cpu", "cuda", "jetson", "rpi")
GPU_BACKENDS = ("cuda", "jetson")
PAIRED_BUDGET_S = 0.5  # seconds of each side's passes behind a speed-up, at least
MAX_PAIRED_ROUNDS = 1000


@dataclass(frozen=True)
class PruneSpec:
    """A pruning configuration: by ratios (`heads`, `tokens`), or by a MACs `saving` that the
    ratios are searched for (`by` heads, tokens or both), then a `schedule`."""

    heads: float = 0.0
    tokens: float = 0.0
    head_policy: str = "amg"
    token_policy: str = "amg"
    allocation: str = "global"
    saving: float = 0.0
    by: str = ""  # with `saving`: heads | tokens | both
    schedule: Schedule = ONE_SHOT

    def __post_init__(self) -> None:
        if bool(self.saving) != bool(self.by):
            raise ValueError("a MACs saving needs `by` (heads, tokens or both), and `by` needs a saving")
        if self.saving and (self.heads or self.tokens):
            raise ValueError("give ratios or a MACs saving, not both")

    @property
    def uses_heads(self) -> bool:
        return self.by in ("heads", "both") if self.saving else self.heads > 0

    @property
    def uses_tokens(self) -> bool:
        return self.by in ("tokens", "both") if self.saving else self.tokens > 0

    @property
    def needs_data(self) -> bool:
        return ((self.uses_heads and self.head_policy in ("amg", "amg-lowest", "gradient"))
                or (self.uses_tokens and self.token_policy == "amg") or self.schedule != ONE_SHOT)

    @property
    def config_id(self) -> str:
        """e.g. `heads0.25:amg`, `heads0.5:amg/per-block+tokens0.5:amg`, `save0.3:heads:amg+tokens:amg@ft300`."""
        heads = f"{self.heads:g}" if not self.saving else ""
        tokens = f"{self.tokens:g}" if not self.saving else ""
        parts = []
        if self.uses_heads:
            allocation = "" if self.allocation == "global" else f"/{self.allocation}"
            parts.append(f"heads{heads}:{self.head_policy}{allocation}")
        if self.uses_tokens:
            parts.append(f"tokens{tokens}:{self.token_policy}")
        name = "+".join(parts) or "unpruned"
        if self.saving:
            name = f"save{self.saving:g}:{name}"
        return name if self.schedule == ONE_SHOT else f"{name}@{self.schedule.label}"


UNPRUNED = PruneSpec()


@dataclass(frozen=True)
class Case:
    spec: PruneSpec
    backend: str
    batch: int
    precision: str = "fp32"

    @property
    def id(self) -> str:
        return f"{self.spec.config_id}-{self.backend}-{self.precision}-b{self.batch}"


@dataclass(frozen=True)
class Profile:
    ratios: tuple[float, ...]
    head_policies: tuple[str, ...]
    token_policies: tuple[str, ...]
    batches: tuple[int, ...]
    backends: tuple[str, ...]
    paired_rounds: int  # interleaved unpruned/pruned rounds behind each speed-up
    rounds: int  # pytest-benchmark rounds behind each latency
    combined: bool = True  # also heads + tokens at each ratio, with the AMG policies
    accuracy: bool = True
    memory: bool = True
    specs: tuple[PruneSpec, ...] = ()  # fixed configurations (then `ratios` and policies are unused)
    # fp16/bf16 autocast runs on the GPU backends only, unless precisions are asked for explicitly
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")


# The equal-MACs study: every policy at the same fvcore MACs savings, one-shot, fine-tuned
# and iterative at the same fine-tuning cost (300 distilled steps, ~1.5 min each on 2 cores,
# cached). Savings a mode cannot reach on the model skip with the reachable maximum.
STUDY_SAVINGS = (0.1, 0.2, 0.3, 0.4)
STUDY_STEPS = 300
_HEAD_METHODS = [("amg", "global"), ("amg", "per-block"), ("amg-lowest", "global"), ("random", "global"),
                 ("magnitude", "global"), ("gradient", "global")]
_TOKEN_METHODS = ["amg", "random", "evit", "tome"]
_BOTH_METHODS = [("amg", "amg", "global"), ("amg", "amg", "per-block"), ("random", "random", "global")]


def equal_macs_specs(savings: Sequence[float] = STUDY_SAVINGS, steps: int = STUDY_STEPS) -> tuple[PruneSpec, ...]:
    finetune, iterative = Schedule("finetune", steps), Schedule("iterative", steps, rounds=3)
    specs: list[PruneSpec] = [PruneSpec(schedule=finetune)]  # what the extra training alone buys
    for saving in savings:
        heads = [PruneSpec(head_policy=p, allocation=a, saving=saving, by="heads") for p, a in _HEAD_METHODS]
        tokens = [PruneSpec(token_policy=p, saving=saving, by="tokens") for p in _TOKEN_METHODS]
        both = [PruneSpec(head_policy=h, token_policy=t, allocation=a, saving=saving, by="both")
                for h, t, a in _BOTH_METHODS]
        specs += heads + tokens + both
        # Fine-tuning where a method family is at home: static tokens only reach ~15% on
        # small ViTs, heads ~29%, heads + tokens ~32%; EViT/ToMe go further.
        tuned = [s for s in heads if s.head_policy in ("amg", "random", "gradient")] + both + tokens[2:]
        if saving < 0.15:
            tuned = [heads[0], heads[3]] + tokens[:2]
        specs += [replace(s, schedule=finetune) for s in tuned]
        iterated = [heads[0], tokens[0]] if saving < 0.15 else heads[:2] + both[:2]
        specs += [replace(s, schedule=iterative) for s in iterated]
    return tuple(specs)


PROFILES = {
    # <= 2 minutes on a 2-core CPU once the default model is cached
    # (a forward of the small model takes ~5 ms: many rounds cost little and steady the ratio)
    "quick": Profile(ratios=(0.25,), head_policies=("amg", "random"), token_policies=("amg", "random"),
                     batches=(1,), backends=("cpu",), paired_rounds=200, rounds=50),
    # <= 5 minutes once cached: two ratios, the main baselines, batch 1 and 32, deployment backends
    "default": Profile(ratios=(0.25, 0.5), head_policies=("amg", "random", "magnitude", "gradient"),
                       token_policies=("amg", "random", "tome"), batches=(1, 32),
                       backends=("cpu", "cuda", "jetson", "rpi", "onnxruntime"), paired_rounds=12, rounds=8),
    # the equal-MACs study behind the README's results tables (~1 hour on 2 cores the first
    # time, for the fine-tuning; then ~15 minutes)
    "equal-macs": Profile(ratios=(), head_policies=(), token_policies=(), batches=(1, 32), backends=("cpu",),
                          paired_rounds=12, rounds=8, specs=equal_macs_specs()),
    "full": Profile(ratios=(0.25, 0.5, 0.75), head_policies=("amg", "amg-lowest", "random", "magnitude", "gradient"),
                    token_policies=("amg", "random", "evit", "tome"), batches=(1, 32),
                    backends=("cpu", "cuda", "jetson", "rpi", "torchscript", "onnxruntime"), paired_rounds=30, rounds=20),
}


def build_cases(profile: Profile, ratios: Sequence[float] | None = None, policies: Sequence[str] | None = None,
                backends: Sequence[str] | None = None, batches: Sequence[int] | None = None,
                precisions: Sequence[str] | None = None) -> list[Case]:
    """The profile's cases; explicit `ratios`/`policies`/`backends`/`batches`/`precisions` replace its own."""
    if profile.specs:
        if ratios:
            raise ValueError("this profile fixes its configurations by MACs saving: ratios do not apply")
        specs = [UNPRUNED] + [spec for spec in profile.specs if not policies or (
            (not spec.uses_heads or spec.head_policy in policies) and (not spec.uses_tokens or spec.token_policy in policies))]
    else:
        specs = _ratio_specs(profile, ratios or profile.ratios, policies)
    return [Case(spec, backend, batch, precision) for backend in (backends or profile.backends)
            for precision in (precisions or profile.precisions)
            if precisions or precision == "fp32" or backend in GPU_BACKENDS
            for batch in (batches or profile.batches) for spec in specs]


def _ratio_specs(profile: Profile, ratios: Sequence[float], policies: Sequence[str] | None) -> list[PruneSpec]:
    head_policies = tuple(p for p in (policies or profile.head_policies) if p in _HEAD_POLICIES)
    token_policies = tuple(p for p in (policies or profile.token_policies) if p in _TOKEN_POLICIES)
    specs = [UNPRUNED]
    for ratio in ratios:
        specs += [PruneSpec(heads=ratio, head_policy=p) for p in head_policies]
        specs += [PruneSpec(tokens=ratio, token_policy=p) for p in token_policies]
        if profile.combined and "amg" in head_policies and "amg" in token_policies:
            specs.append(PruneSpec(heads=ratio, tokens=ratio))
    return specs


_HEAD_POLICIES = ("amg", "amg-lowest", "random", "magnitude", "gradient")
_TOKEN_POLICIES = ("amg", "random", "evit", "tome")


def slowed(runner: Runner, factor: float) -> Runner:
    """`runner`, made `factor` times slower by busy-waiting after each pass (like real extra work)."""
    if factor < 1:
        raise ValueError(f"a slowdown factor must be >= 1, got {factor}")

    def run() -> object:
        start = time.perf_counter()
        out = runner.run()
        if runner.synchronize:
            runner.synchronize()
        until = time.perf_counter() + (factor - 1) * (time.perf_counter() - start)
        while time.perf_counter() < until:
            pass
        return out

    return Runner(run, runner.synchronize, runner.torch_device, f"{runner.note} slowed x{factor}".strip())


def run_metadata() -> dict[str, Any]:
    """Columns shared by every row of a run: who, where, with what software."""
    import timm

    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(amg.__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "run_id": f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        "timestamp": now.isoformat(timespec="seconds"),
        "device_id": device_id(),
        "device_name": device_name(),
        "amg_version": amg.__version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "git_revision": revision or "unknown",
    }


@dataclass
class Suite:
    """State shared by a session's cases: the base model, data, pruned models, references."""

    model: ReIDViT
    checkpoint: str
    profile: Profile
    dataset: ReIDDataset | None  # None: no accuracy (untrained preset)
    threads: int
    progress: Progress
    metadata: dict[str, Any] = field(default_factory=run_metadata)
    rows: list[dict[str, Any]] = field(default_factory=list)
    # Fault injection to prove the gate works: config_id -> factor (1.2 = 20% slower).
    slowdown: dict[str, float] = field(default_factory=dict)
    _pruned: dict[PruneSpec, ReIDViT] = field(default_factory=dict)
    _plans: dict[PruneSpec, PrunePlan | OutOfReach] = field(default_factory=dict)
    _training: TrainingSet | None = None
    _fingerprint: str | None = None
    _accuracy: dict[PruneSpec, dict[str, float]] = field(default_factory=dict)
    _references: dict[tuple[str, str, int], Runner] = field(default_factory=dict)
    _calibration: CalibrationData | None = None
    _evaluator: Evaluator | None = None
    _base_macs: int | None = None

    def calibration(self) -> CalibrationData:
        if self._calibration is None:
            if self.dataset is None:
                raise ValueError("AMG and gradient policies need data with labels: pass --amg-data or use a trained model")
            self._calibration = CalibrationData.from_dataset(self.dataset, self.model.config.img_size,
                                                             progress=self.progress)
        return self._calibration

    def plan(self, spec: PruneSpec) -> PrunePlan:
        """The one-shot plan of `spec` (shared by its schedules); OutOfReach is remembered too."""
        key = replace(spec, schedule=ONE_SHOT)
        if key not in self._plans:
            data = self.calibration() if key.needs_data else None
            self.progress(f"planning {key.config_id}")
            try:
                if spec.saving:
                    self._plans[key] = plan_for_saving(self.model, spec.saving, spec.by, spec.head_policy,
                                                       spec.token_policy, spec.allocation, data)
                else:
                    self._plans[key] = make_plan(self.model, spec.heads, spec.tokens, spec.head_policy,
                                                 spec.token_policy, spec.allocation, data)
            except OutOfReach as error:
                self._plans[key] = error
        if isinstance(self._plans[key], OutOfReach):
            raise self._plans[key]
        return self._plans[key]

    def pruned(self, spec: PruneSpec) -> ReIDViT:
        if spec not in self._pruned:
            if spec == UNPRUNED:
                self._pruned[spec] = self.model
            elif spec.schedule == ONE_SHOT:
                self._pruned[spec] = apply_plan(copy.deepcopy(self.model), copy.deepcopy(self.plan(spec)))
            else:
                self._pruned[spec] = self._trained(spec)
        return self._pruned[spec]

    def _trained(self, spec: PruneSpec) -> ReIDViT:
        """Fine-tuned or iterative: minutes of training, so cached by everything that shapes it."""
        plan = self.plan(spec) if spec.uses_heads or spec.uses_tokens else PrunePlan.unpruned(self.model.config)
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        key = {"base": self._fingerprint, "plan": plan.to_dict(), "schedule": spec.schedule.__dict__,
               "data": str(self.dataset.root), "calibration": self.calibration().description}

        def train() -> ReIDViT:
            self.progress(f"{spec.schedule.description}: {spec.config_id} (cached afterwards)")
            if self._training is None:
                self._training = TrainingSet.from_dataset(self.dataset, self.model.config.img_size, self.progress)
            return run_schedule(self.model, plan, spec.schedule, self.calibration(), self._training, self.progress)

        return cached_pruned(key, train, self.progress)

    def save_attention_record(self, results_dir: str | Path) -> Path | None:
        """For `amg report`'s pictures: the unpruned model's head entropy, a sample query image and
        the one-shot plans made in this session. None when nothing was calibrated (no AMG plan)."""
        from amg.data.preload import preload_images
        from amg.explain import make_record, save_record

        if self._calibration is None or self.dataset is None:
            return None
        plans = {key.config_id: plan for key, plan in self._plans.items() if isinstance(plan, PrunePlan)}
        record = make_record(self.model, self.checkpoint, self._calibration.images, plans)
        sample = preload_images(self.dataset.query_sets["query"][:1], self.model.config.img_size)[0]
        return save_record(record, sample, results_dir)

    def runner(self, case: Case) -> Runner:
        runner = prepare(case.backend, copy.deepcopy(self.pruned(case.spec)), case.batch, case.precision, self.threads)
        factor = self.slowdown.get(case.spec.config_id)
        return slowed(runner, factor) if factor else runner

    def reference(self, case: Case) -> Runner:
        key = (case.backend, case.precision, case.batch)
        if key not in self._references:
            self._references[key] = self.runner(Case(UNPRUNED, case.backend, case.batch, case.precision))
        return self._references[key]

    def accuracy(self, spec: PruneSpec) -> dict[str, float]:
        if self.dataset is None or not self.profile.accuracy:
            return {}
        if spec not in self._accuracy:
            if self._evaluator is None:
                self._evaluator = Evaluator(self.dataset, self.model.config.img_size, self.progress)
            results = self._evaluator.evaluate(self.pruned(spec))
            synthetic = (self.dataset.root / MANIFEST).is_file()  # amg.data.synthetic writes it
            row = {"dataset": "synthetic" if synthetic else self.dataset.name}
            for name, metrics in results.items():
                if name in ("query", "occluded"):
                    values = metrics.as_dict()
                    row.update({f"{name}_{k}": values[k] for k in ("rank1", "rank5", "mAP", "mINP")})
            self._accuracy[spec] = row
        return self._accuracy[spec]

    def measure(self, case: Case, runner: Runner, samples_s: Sequence[float]) -> dict[str, Any]:
        """The CSV row of `case`, given its runner and pytest-benchmark's timing samples."""
        model = self.pruned(case.spec)
        plan = current_plan(model)
        if self._base_macs is None:
            self._base_macs = count_macs(self.model).total
        macs = count_macs(model).total
        params = sum(p.numel() for p in model.parameters())
        stats = LatencyStats.of(list(samples_s))
        row: dict[str, Any] = {
            **self.metadata, "backend": case.backend, "precision": case.precision, "threads": self.threads,
            "batch": case.batch, "model": self.model.config.name, "checkpoint": self.checkpoint,
            "input_size": "x".join(map(str, self.model.config.img_size)), "config_id": case.spec.config_id,
            "head_policy": case.spec.head_policy if case.spec.uses_heads else "none",
            "token_policy": case.spec.token_policy if case.spec.uses_tokens else "none",
            "allocation": case.spec.allocation, "schedule": case.spec.schedule.description,
            "head_ratio": plan.ratios.get("heads", 0.0), "token_ratio": plan.ratios.get("tokens", 0.0),
            "params": params, "param_mb": params * 4 / 2**20, "macs": macs, "gmacs": macs / 1e9,
            "macs_saving": 1 - macs / self._base_macs, "latency_median_ms": stats.median_ms,
            "latency_p90_ms": stats.p90_ms, "latency_p99_ms": stats.p99_ms, "latency_rounds": stats.rounds,
        }
        if case.spec != UNPRUNED:  # (the unpruned model fine-tuned too: same shapes, speed-up ~1)
            # Fast passes need many rounds: a single hiccup among a dozen 1.5 ms rounds moved an
            # ONNX speed-up from 1.1 to 0.35 here. Aim at PAIRED_BUDGET_S of each side.
            rounds = max(self.profile.paired_rounds,
                         min(MAX_PAIRED_ROUNDS, math.ceil(PAIRED_BUDGET_S * 1e3 / stats.median_ms)))
            speedup, _, _ = paired_speedup(self.reference(case), runner, rounds, synchronize=runner.synchronize)
            row.update(speedup=speedup, latency_saving=1 - 1 / speedup)
        if self.profile.memory and case.backend in TORCH_BACKENDS:
            row.update(self._memory(case, model))
        row.update(self.accuracy(case.spec))
        self.rows.append(row)
        return row

    def _memory(self, case: Case, model: ReIDViT) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as folder:
            path = save_pruned(model, Path(folder) / "model.pt")
            peak = measure_peak_memory(path, case.backend, case.batch, case.precision, self.threads)
        out = {"peak_rss_mb": peak.peak_rss_mb, "forward_rss_mb": peak.peak_rss_mb - peak.baseline_rss_mb}
        if peak.cuda_max_allocated_mb is not None:
            out["cuda_max_allocated_mb"] = peak.cuda_max_allocated_mb
        return out
