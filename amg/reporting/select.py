"""Hardware-aware plan selection: the most accurate configuration whose *measured* latency on
a device fits a budget, chosen from the suite's CSVs rather than from MACs.

Each configuration counts with its newest measurement for the device, backend, precision
and batch; the Pareto frontier (lower latency, higher accuracy) shows what the budget
trades. `amg select` is the command; with `--measure` it runs the suite first.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pandas as pd
from tabulate import tabulate

from amg.benchmark.profiles import PruneSpec
from amg.errors import InputError
from amg.measure.contention import contended
from amg.pruning.schedule import fine_tuning_stages
from amg.reporting.loading import run_timestamps
from amg.reporting.pareto import pareto_front

LATENCY = "latency_median_ms"
PAIRED = "latency_paired_ms"
LATENCIES = {"paired": PAIRED, "median": LATENCY}
ACCURACY_METRICS = tuple(f"{query}_{name}" for query in ("query", "occluded")
                         for name in ("rank1", "rank5", "mAP", "mINP"))


class NoMeasurements(InputError):
    """Nothing measured for this device/backend/batch: the suite has to run there first."""


@dataclass(frozen=True)
class Target:
    device_id: str
    backend: str
    batch: int = 1
    precision: str = "fp32"
    model: str | None = None  # preset name; None = every model measured there

    def describe(self) -> str:
        model = f", model {self.model}" if self.model else ""
        return f"{self.backend} {self.precision} batch {self.batch} on {self.device_id}{model}"


@dataclass
class Selection:
    target: Target
    budget_ms: float
    metric: str
    latency: str  # the column compared with the budget
    candidates: pd.DataFrame  # newest measurement of each configuration
    front: pd.DataFrame  # Pareto frontier of latency against `metric`
    chosen: pd.Series | None  # None: nothing fits the budget

    @property
    def fastest_ms(self) -> float:
        return float(self.candidates[self.latency].min())


def with_paired_latency(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` (one per configuration) plus PAIRED: the unpruned model's median divided by the
    configuration's speed-up.

    A configuration's own median comes from its own block of rounds, and a run's medians as
    a whole drift with the load of a shared machine (the unpruned median moved by 25% between
    two runs here); speed-ups are timed interleaved with the unpruned model and hold. So all
    configurations are put on the scale of one measurement, the unpruned row's (the newest),
    per model and checkpoint. NaN where either is missing.
    """
    keys = ["model", "checkpoint"]
    unpruned = rows[rows["config_id"] == "unpruned"].groupby(keys)[LATENCY].median().rename("_reference")
    joined = rows.join(unpruned, on=keys)
    speedup = joined["speedup"].where(joined["config_id"] != "unpruned", 1.0)
    return rows.assign(**{PAIRED: joined["_reference"] / speedup})


def candidates(frame: pd.DataFrame, target: Target) -> pd.DataFrame:
    """The newest row of each (model, checkpoint, configuration) measured on `target`."""
    rows = frame[(frame["device_id"] == target.device_id) & (frame["backend"] == target.backend)
                 & (frame["batch"] == target.batch) & (frame["precision"] == target.precision)]
    if target.model:
        rows = rows[rows["model"] == target.model]
    if rows.empty:
        raise NoMeasurements(f"no measurements of {target.describe()}")
    newest = rows.assign(_time=run_timestamps(rows)).sort_values(["_time", "run_id"], na_position="first",
                                                              kind="stable")
    newest = newest.groupby(["model", "checkpoint", "config_id"], sort=False).tail(1).drop(columns="_time")
    return with_paired_latency(newest)


def select(frame: pd.DataFrame, target: Target, budget_ms: float, metric: str = "query_mAP",
           latency: str = "paired") -> Selection:
    """The best-`metric` configuration whose measured latency (`latency`: paired or median) fits `budget_ms`."""
    if latency not in LATENCIES:
        raise InputError(f"latency must be one of {', '.join(LATENCIES)}, got {latency!r}")
    column = LATENCIES[latency]
    if budget_ms <= 0:
        raise InputError(f"the latency budget must be > 0 ms, got {budget_ms}")
    if metric not in ACCURACY_METRICS:
        raise InputError(f"unknown accuracy metric {metric!r}; choose one of {', '.join(ACCURACY_METRICS)}")
    rows = candidates(frame, target)
    measured = rows.dropna(subset=[metric, column])
    if measured.empty:
        raise NoMeasurements(f"the measurements of {target.describe()} have no {metric} (latency-only runs, "
                             "e.g. a preset with random weights): run the suite with a trained model")
    datasets = sorted(measured["dataset"].dropna().astype(str).unique())
    if len(datasets) > 1:
        raise InputError(f"accuracy measured on different data sets ({', '.join(datasets)}) is not comparable: "
                         "choose one model with --model")
    fits = measured[measured[column] <= budget_ms]
    chosen = None
    if not fits.empty:
        chosen = fits.sort_values([metric, column], ascending=[False, True], kind="stable").iloc[0]
    return Selection(target, budget_ms, metric, column, measured, pareto_front(measured, column, metric), chosen)


def frontier_table(selection: Selection) -> str:
    """The Pareto frontier as a text table; the chosen row is marked with `*`."""
    chosen_key = None if selection.chosen is None else (selection.chosen["model"], selection.chosen["config_id"])
    rows = []
    for _, row in selection.front.iterrows():
        mark = "*" if (row["model"], row["config_id"]) == chosen_key else ""
        fits = "yes" if row[selection.latency] <= selection.budget_ms else "no"
        saving = "" if pd.isna(row["macs_saving"]) else f"{100 * row['macs_saving']:.1f}"
        speedup = "" if pd.isna(row["speedup"]) else f"{row['speedup']:.2f}"
        rows.append([mark, row["model"], row["config_id"], f"{row[PAIRED]:.3f}", f"{row[LATENCY]:.3f}", speedup,
                     saving, f"{100 * row[selection.metric]:.1f}", fits])
    headers = ["", "model", "config", "paired ms", "median ms", "speed-up", "MACs saved %", selection.metric, "fits"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def prune_command(config_id: str, checkpoint: str = "default") -> str | None:
    """The `amg prune` command that makes configuration `config_id` (as the suite names it),
    or None for the unpruned model and names it does not know."""
    spec = PruneSpec.from_config_id(config_id)
    if spec is None or not spec.prunes:
        return None
    args = ["--macs-saving", f"{spec.saving:g}", "--saving-by", spec.by] if spec.saving else []
    allocation = ["--allocation", spec.allocation] if spec.allocation != "global" else []
    if spec.uses_heads:
        args += ([] if spec.saving else ["--heads", f"{spec.heads:g}"]) + ["--head-policy", spec.head_policy]
        args += allocation
    if spec.uses_tokens:
        args += ([] if spec.saving else ["--tokens", f"{spec.tokens:g}"]) + ["--token-policy", spec.token_policy]
    if spec.uses_mlp:
        args += ([] if spec.saving else ["--mlp", f"{spec.mlp:g}"]) + ["--mlp-policy", spec.mlp_policy]
        args += [] if spec.uses_heads else allocation
    if spec.seed:
        args += ["--seed", str(spec.seed)]
    schedule = spec.schedule
    if schedule.kind == "finetune":
        args += ["--finetune", str(schedule.steps)]
    elif schedule.kind == "iterative":  # the suite spreads the total steps over the head rounds and the token stage
        stages = fine_tuning_stages(schedule.rounds, spec.uses_heads, spec.uses_tokens, spec.uses_mlp)
        args += ["--iterative-rounds", str(schedule.rounds), "--finetune-steps", str(schedule.steps // stages)]
    model = [] if checkpoint == "default" else ["--model", checkpoint]
    return shlex.join(["amg", "prune", *model, *args, "--out", "pruned.pt"])  # copy-paste safe


def summary(selection: Selection) -> str:
    kind = "paired (unpruned median / speed-up)" if selection.latency == PAIRED else "median"
    lines = [f"Pareto frontier of {selection.metric} against measured {kind} latency, "
             f"{selection.target.describe()} ({len(selection.candidates)} configurations measured):", "",
             frontier_table(selection), ""]
    chosen = selection.chosen
    if chosen is None:
        lines.append(f"nothing fits {selection.budget_ms:g} ms: the fastest measured configuration takes "
                     f"{selection.fastest_ms:.3f} ms")
    else:
        lines.append(f"chosen: {chosen['config_id']} ({chosen['model']}): {chosen[selection.latency]:.3f} ms <= "
                     f"{selection.budget_ms:g} ms, {selection.metric} {100 * chosen[selection.metric]:.1f}")
        command = prune_command(str(chosen["config_id"]), str(chosen["checkpoint"]))
        if command:
            lines.append(f"make it with: {command}")
        share = chosen.get("other_cpu_share")
        if share is not None and not pd.isna(share) and contended(float(share)):
            lines.append(f"warning: {chosen['config_id']} was timed while other processes took {100 * share:.0f}% "
                         "of the CPU: its latency deserves less trust; measure it again on a quiet machine")
    return "\n".join(lines)
