"""How `pytest bench/` measures a case: pruned models, runners, memory, accuracy, one CSV row.

bench/ only turns `Case`s (amg.benchmark.profiles) into pytest parameters and hands the timing loop
to pytest-benchmark; everything else (pruning, runners, memory, accuracy, the row) is here.
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
from amg.benchmark.plan_store import PlanStore
from amg.benchmark.profiles import UNPRUNED, Case, Profile, PruneSpec
from amg.benchmark.pruned_models import PrunedModels
from amg.benchmark.journals import append_journal, queries_journal
from amg.benchmark.study_folder import StudyFolder
from amg.data.layout import ReIDDataset
from amg.data.transforms import normalize
from amg.errors import InputError
from amg.measure.backend_registry import EAGER_BACKENDS
from amg.measure.backends import Runner, prepare
from amg.measure.contention import CpuWatch
from amg.measure.device import device_id, device_name, machine_load
from amg.measure.flops import count_macs
from amg.measure.latency import LatencyStats, paired_rounds, paired_speedup
from amg.measure.memory import measure_peak_memory
from amg.model.pruned import current_plan, save_pruned
from amg.model.vit import ReIDViT, build_model

Progress = Callable[[str], None]
PAIRED_BUDGET_S = 0.5  # seconds of each side's passes behind a speed-up, at least
MAX_PAIRED_ROUNDS = 1000


def slowed(runner: Runner, factor: float) -> Runner:
    """`runner`, made `factor` times slower by busy-waiting after each pass (like real extra work)."""
    if factor < 1:
        raise InputError(f"a slowdown factor must be >= 1, got {factor}")

    def run() -> object:
        start = time.perf_counter()
        out = runner.run()
        if runner.synchronize:
            runner.synchronize()
        until = time.perf_counter() + (factor - 1) * (time.perf_counter() - start)
        while time.perf_counter() < until:
            pass
        return out

    return replace(runner, run=run, note=f"{runner.note} slowed x{factor}".strip())


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


def untrained_model(preset: str) -> tuple[ReIDViT, str]:
    """Preset `preset` with seeded random weights (the same model on every run), and its source label."""
    torch.manual_seed(0)
    return build_model(preset).eval(), f"{preset} (random weights)"


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
    # {config_id: {query set: per-query AP and Rank-1 hits}}: `amg.benchmark.query_record`
    query_values: dict[str, dict[str, dict[str, list]]] = field(default_factory=dict)
    # Fault injection to prove the gate works: config_id -> factor (1.2 = 20% slower).
    slowdown: dict[str, float] = field(default_factory=dict)
    # Where one-shot plans are reused from and new ones kept (None: plan every run anew).
    plan_store: PlanStore | None = None
    # Each measured row is appended here at once, so a killed run keeps what it measured.
    journal: Path | None = None
    # A finished accuracy study: pruned models and accuracy come from it, nothing is trained here.
    study: StudyFolder | None = None
    models: PrunedModels = field(init=False)
    _accuracy: dict[PruneSpec | tuple[PruneSpec, str, str], dict[str, Any]] = field(default_factory=dict)
    _references: dict[tuple[str, str, int], Runner] = field(default_factory=dict)
    _base_macs: int | None = None
    _journaled_queries: set[str] = field(default_factory=set)  # configurations whose values the journal holds
    _other_model: Suite | None = None  # the suite of the other preset a multi-model profile is measuring

    def __post_init__(self) -> None:
        self.models = PrunedModels(self.model, self.dataset, self.progress, self.plan_store, study=self.study)

    @classmethod
    def untrained(cls, preset: str, profile: Profile, threads: int, progress: Progress, **shared: Any) -> Suite:
        """A suite of preset `preset` with seeded random weights: latency and MACs, no accuracy."""
        return cls(*untrained_model(preset), profile, None, threads, progress, **shared)

    def at(self, case: Case) -> Suite:
        """The suite measuring `case`'s model: this one, or (profiles spanning presets) the other
        preset's, which shares this run's rows, metadata and journal. One other preset is kept at a
        time: cases come model by model, and a ViT-Base's pruned copies take gigabytes."""
        if not case.model or case.model == self.model.config.name:
            return self
        if self._other_model is None or self._other_model.model.config.name != case.model:
            self._other_model = None  # let the previous preset's models go before the next one is built
            self.progress(f"measuring {case.model} with random weights")
            self._other_model = Suite.untrained(case.model, self.profile, self.threads, self.progress,
                                                metadata=self.metadata, rows=self.rows, query_values=self.query_values,
                                                slowdown=self.slowdown, journal=self.journal)
        return self._other_model

    def pruned(self, spec: PruneSpec) -> ReIDViT:
        return self.models.pruned(spec)

    def save_attention_record(self, results_dir: str | Path) -> Path | None:
        """For `amg report`'s pictures: the unpruned model's head entropy, a sample query image and
        the one-shot plans made in this session. None when nothing was calibrated (no AMG plan)."""
        from amg.benchmark.attention_record import save_record
        from amg.benchmark.recording import make_record
        from amg.data.preload import preload_images

        calibration = self.models.calibrated
        if calibration is None or self.dataset is None:
            return None
        record = make_record(self.model, self.checkpoint, calibration.images, self.models.plans_made())
        sample = preload_images(self.dataset.query_sets["query"][:1], self.model.config.img_size)[0]
        return save_record(record, sample.permute(1, 2, 0).numpy(), results_dir)

    def runner(self, case: Case) -> Runner:
        calibration = None
        if case.precision == "int8" and self.dataset is not None:  # a model without data calibrates on noise
            calibration = normalize(self.models.calibration().images)
        runner = prepare(case.backend, copy.deepcopy(self.pruned(case.spec)), case.batch, case.precision, self.threads,
                         calibration)
        factor = self.slowdown.get(case.spec.config_id)
        return slowed(runner, factor) if factor else runner

    def reference(self, case: Case) -> Runner:
        key = (case.backend, case.precision, case.batch)
        if key not in self._references:
            self._references[key] = self.runner(Case(UNPRUNED, case.backend, case.batch, case.precision))
        return self._references[key]

    def accuracy(self, case: Case, runner: Runner) -> dict[str, Any]:
        """Re-ID metrics of `case`'s model in PyTorch fp32 (measured, or the study's), or, for a
        reduced-precision `case`, of what its `runner` runs (an INT8 model is another model: its
        accuracy is measured, which needs the data set)."""
        if not self.profile.accuracy or (self.dataset is None and self.study is None):
            return {}
        spec = case.spec
        runtime = runner.features is not None and case.precision != "fp32"
        if runtime and self.dataset is None:
            return {}
        # the class-token block changes no feature: its accuracy is the pruning's
        key = (spec.pruning, case.backend, case.precision) if runtime else spec.pruning
        if key not in self._accuracy:
            if runtime:
                self.progress(f"accuracy of {spec.config_id} as {case.backend} runs it at {case.precision}")
                result = self.models.accuracy(spec, compiled=(runner.features, runner.batch),
                                              label=f"{case.backend} {case.precision}")
            else:  # the per-query record pairs PyTorch models with each other
                result = self.models.accuracy(spec.pruning)
                self.query_values[spec.pruning.config_id] = result.queries
            self._accuracy[key] = result.row
        if not runtime and spec.pruning.config_id in self.query_values:  # under this configuration's name too
            self.query_values[spec.config_id] = self.query_values[spec.pruning.config_id]
        return self._accuracy[key]

    def macs(self, spec: PruneSpec) -> tuple[int, int]:
        """(fvcore MACs per image of `spec`'s model, of the unpruned model)."""
        if self._base_macs is None:
            self._base_macs = count_macs(self.model).total
        return count_macs(self.pruned(spec)).total, self._base_macs

    def measure(self, case: Case, runner: Runner, samples_s: Sequence[float]) -> dict[str, Any]:
        """The CSV row of `case`, given its runner and pytest-benchmark's timing samples."""
        model = self.pruned(case.spec)
        plan = current_plan(model)
        macs, _ = self.macs(case.spec)
        params = sum(p.numel() for p in model.parameters())
        stats = LatencyStats.of(list(samples_s))
        row: dict[str, Any] = {
            **self.metadata, "backend": case.backend, "precision": case.precision, "threads": self.threads,
            "batch": case.batch, "model": self.model.config.name, "checkpoint": self.checkpoint,
            "input_size": "x".join(map(str, self.model.config.img_size)), "feature": model.neck_feat,
            "config_id": case.spec.config_id,
            "head_policy": case.spec.head_policy if case.spec.uses_heads else "none",
            "token_policy": case.spec.token_policy if case.spec.uses_tokens else "none",
            "allocation": case.spec.allocation, "schedule": case.spec.schedule.description,
            "head_ratio": plan.ratios.get("heads", 0.0), "token_ratio": plan.ratios.get("tokens", 0.0),
            "mlp_policy": case.spec.mlp_policy if case.spec.uses_mlp else "none",
            "mlp_ratio": plan.ratios.get("mlp", 0.0),
            "last_block": "class-token" if model.class_token_block_active else "full",
            "params": params, "param_mb": params * 4 / 2**20, "macs": macs, "gmacs": macs / 1e9,
            "macs_saving": 1 - macs / self._base_macs, "latency_median_ms": stats.median_ms,
            "latency_p90_ms": stats.p90_ms, "latency_p99_ms": stats.p99_ms, "latency_rounds": stats.rounds,
        }
        if case.spec != UNPRUNED:  # (the unpruned model fine-tuned too: same shapes, speed-up ~1)
            speedup, share = self._speedup(self.reference(case), runner, stats.median_ms)
            row.update(speedup=speedup.ratio, speedup_ci_low=speedup.low, speedup_ci_high=speedup.high,
                       latency_saving=1 - 1 / speedup.ratio, other_cpu_share=share)
        if case.precision != "fp32":  # what the precision buys over the fp32 unpruned model, alone or with pruning
            fp32 = self.reference(Case(UNPRUNED, case.backend, case.batch, "fp32"))
            speedup, _ = self._speedup(fp32, runner, stats.median_ms)
            row.update(fp32_speedup=speedup.ratio, fp32_speedup_ci_low=speedup.low, fp32_speedup_ci_high=speedup.high)
        row.update(load_avg_1min=machine_load(), output_max_diff=runner.output_max_diff,
                   output_cosine=runner.output_cosine)
        if self.profile.memory and case.backend in EAGER_BACKENDS:  # an export backend's child would measure the exporter
            row.update(self._memory(case, model))
        row.update(self.accuracy(case, runner))
        self.rows.append(row)
        if self.journal is not None:
            append_journal(self.journal, row)
            config_id = case.spec.config_id
            if config_id in self.query_values and config_id not in self._journaled_queries:  # what reports pair on
                append_journal(queries_journal(self.journal), {config_id: self.query_values[config_id]})
                self._journaled_queries.add(config_id)
        return row

    def _speedup(self, reference: Runner, runner: Runner, median_ms: float):
        """`reference` median / `runner` median over interleaved rounds, and the share of the CPU others took."""
        # Fast passes need many rounds: a single hiccup among a dozen 1.5 ms rounds moved an
        # ONNX speed-up from 1.1 to 0.35 here. Aim at PAIRED_BUDGET_S of each side.
        rounds = max(self.profile.paired_rounds, min(MAX_PAIRED_ROUNDS, math.ceil(PAIRED_BUDGET_S * 1e3 / median_ms)))
        with CpuWatch() as watch:
            speedup = paired_speedup(*paired_rounds(reference, runner, rounds, synchronize=runner.synchronize))
        return speedup, watch.other_share

    def _memory(self, case: Case, model: ReIDViT) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as folder:
            path = save_pruned(model, Path(folder) / "model.pt")
            peak = measure_peak_memory(path, case.backend, case.batch, case.precision, self.threads)
        out = {"peak_rss_mb": peak.peak_rss_mb, "forward_rss_mb": peak.peak_rss_mb - peak.baseline_rss_mb}
        if peak.cuda_max_allocated_mb is not None:
            out["cuda_max_allocated_mb"] = peak.cuda_max_allocated_mb
        return out
