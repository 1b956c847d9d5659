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
from dataclasses import dataclass, field
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
from amg.prune import CalibrationData, apply_plan, make_plan, save_pruned

Progress = Callable[[str], None]
# Peak memory is measured where the child process runs the model as deployed; the export
# backends' children would mostly measure the exporter, so their memory is left unmeasured.
TORCH_BACKENDS = ("cpu", "cuda", "jetson", "rpi")
PAIRED_BUDGET_S = 0.5  # seconds of each side's passes behind a speed-up, at least
MAX_PAIRED_ROUNDS = 1000


@dataclass(frozen=True)
class PruneSpec:
    heads: float = 0.0
    tokens: float = 0.0
    head_policy: str = "amg"
    token_policy: str = "amg"
    allocation: str = "global"

    @property
    def config_id(self) -> str:
        if not self.heads and not self.tokens:
            return "unpruned"
        parts = []
        if self.heads:
            allocation = "" if self.allocation == "global" else f"/{self.allocation}"
            parts.append(f"heads{self.heads:g}:{self.head_policy}{allocation}")
        if self.tokens:
            parts.append(f"tokens{self.tokens:g}:{self.token_policy}")
        return "+".join(parts)


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


PROFILES = {
    # <= 2 minutes on a 2-core CPU once the default model is cached
    # (a forward of the small model takes ~5 ms: many rounds cost little and steady the ratio)
    "quick": Profile(ratios=(0.25,), head_policies=("amg", "random"), token_policies=("amg", "random"),
                     batches=(1,), backends=("cpu",), paired_rounds=200, rounds=50),
    # <= 5 minutes once cached: two ratios, the main baselines, batch 1 and 32, deployment backends
    "default": Profile(ratios=(0.25, 0.5), head_policies=("amg", "random", "magnitude", "gradient"),
                       token_policies=("amg", "random", "tome"), batches=(1, 32),
                       backends=("cpu", "cuda", "jetson", "rpi", "onnxruntime"), paired_rounds=12, rounds=8),
    "full": Profile(ratios=(0.25, 0.5, 0.75), head_policies=("amg", "amg-lowest", "random", "magnitude", "gradient"),
                    token_policies=("amg", "random", "evit", "tome"), batches=(1, 32),
                    backends=("cpu", "cuda", "jetson", "rpi", "torchscript", "onnxruntime"), paired_rounds=30, rounds=20),
}


def build_cases(profile: Profile, ratios: Sequence[float] | None = None, policies: Sequence[str] | None = None,
                backends: Sequence[str] | None = None, batches: Sequence[int] | None = None) -> list[Case]:
    """The profile's cases; explicit `ratios`/`policies`/`backends`/`batches` replace its own."""
    ratios = tuple(ratios or profile.ratios)
    head_policies = tuple(p for p in (policies or profile.head_policies) if p in _HEAD_POLICIES)
    token_policies = tuple(p for p in (policies or profile.token_policies) if p in _TOKEN_POLICIES)
    specs = [UNPRUNED]
    for ratio in ratios:
        specs += [PruneSpec(heads=ratio, head_policy=p) for p in head_policies]
        specs += [PruneSpec(tokens=ratio, token_policy=p) for p in token_policies]
        if profile.combined and "amg" in head_policies and "amg" in token_policies:
            specs.append(PruneSpec(heads=ratio, tokens=ratio))
    return [Case(spec, backend, batch) for backend in (backends or profile.backends)
            for batch in (batches or profile.batches) for spec in specs]


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

    def pruned(self, spec: PruneSpec) -> ReIDViT:
        if spec not in self._pruned:
            if spec == UNPRUNED:
                self._pruned[spec] = self.model
            else:
                needs_data = spec.head_policy in ("amg", "amg-lowest", "gradient") or spec.token_policy == "amg"
                self.progress(f"pruning {spec.config_id}")
                plan = make_plan(self.model, spec.heads, spec.tokens, spec.head_policy, spec.token_policy,
                                 spec.allocation, self.calibration() if needs_data else None)
                self._pruned[spec] = apply_plan(copy.deepcopy(self.model), plan)
        return self._pruned[spec]

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
        if self._base_macs is None:
            self._base_macs = count_macs(self.model).total
        macs = count_macs(model).total
        params = sum(p.numel() for p in model.parameters())
        stats = LatencyStats.of(list(samples_s))
        row: dict[str, Any] = {
            **self.metadata, "backend": case.backend, "precision": case.precision, "threads": self.threads,
            "batch": case.batch, "model": self.model.config.name, "checkpoint": self.checkpoint,
            "input_size": "x".join(map(str, self.model.config.img_size)), "config_id": case.spec.config_id,
            "head_policy": case.spec.head_policy if case.spec.heads else "none",
            "token_policy": case.spec.token_policy if case.spec.tokens else "none",
            "allocation": case.spec.allocation, "schedule": "one-shot",
            "head_ratio": case.spec.heads, "token_ratio": case.spec.tokens,
            "params": params, "param_mb": params * 4 / 2**20, "macs": macs, "gmacs": macs / 1e9,
            "macs_saving": 1 - macs / self._base_macs, "latency_median_ms": stats.median_ms,
            "latency_p90_ms": stats.p90_ms, "latency_p99_ms": stats.p99_ms, "latency_rounds": stats.rounds,
        }
        if case.spec != UNPRUNED:
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
