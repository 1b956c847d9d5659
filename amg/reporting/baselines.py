"""Baselines per CPU model: which one a run is gated against, and how one is made from reruns.

A speed-up is a property of the CPU model as much as of the code: the same pruned model runs
its operators in other proportions on a core with another cache or matrix unit (CI's plans
ran 0.93-0.99x as fast, relative to the unpruned model, on an Intel Xeon as on an AMD EPYC in
eager PyTorch, and 0.99-1.09x in ONNX Runtime). So a baseline folder (CI's:
`results/baselines/ci-python-2core/`) holds one CSV per CPU model and thread count, each made
by `amg baseline` from reruns on that CPU. A run is compared with the one whose rows name its
CPU (`device_name`) and thread count; on a CPU with none, accuracy and MACs (which do not
depend on the CPU here) are compared with the reference, the first file by name, and
speed-ups are judged by the MACs-share rule (`amg.reporting.gate.SpeedupRule`).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from amg.benchmark.results import COLUMNS, INTERRUPTED, ReportError, csv_text, safe_name
from amg.benchmark.results_file import ResultsFile, frame_of_rows, read_csv
from amg.errors import InputError
from amg.files import write_text_atomic
from amg.reporting.gate import ACCURACY_METRICS, MACS_METRIC, GateResult, SpeedupRule, Tolerances, compare, held_rows, read_for_gate
from amg.reporting.run_frames import distinct_text, index_rows, machine, mismatches, parse_number

# What a row was measured on, for choosing its baseline: the CPU or GPU and the thread count.
Machine = frozenset  # of (device_name, threads) pairs: a run may measure a CPU and a GPU

MIN_RERUNS = 2  # one run shows its own intervals, not how far a rerun of the same code drifts
# Reruns of one CPU must agree on these: they depend on the model, the plans and the data only.
_EQUAL_IN_EVERY_RERUN = ACCURACY_METRICS + (MACS_METRIC, "macs_saving")
# Speed-up triples: the baseline keeps the reruns' median and an interval spanning all of theirs.
_SPEEDUP_TRIPLES = (("speedup", "speedup_ci_low", "speedup_ci_high"),
                    ("fp32_speedup", "fp32_speedup_ci_low", "fp32_speedup_ci_high"))
_LATENCY_COLUMNS = ("latency_median_ms", "latency_p90_ms", "latency_p99_ms")  # the reruns' median


def machine_of(frame: pd.DataFrame) -> Machine:
    return frozenset(zip(distinct_text(frame, "device_name"), distinct_text(frame, "threads")))


def baseline_file_name(frame: pd.DataFrame) -> str:
    """The conventional file name of a baseline made on the machine that made a run's rows, e.g. amd-epyc-2t.csv."""
    names = [f"{device}-{threads}t" for device, threads in sorted(machine_of(frame))]
    return safe_name("+".join(names)).lower() + ".csv"


@dataclass(frozen=True)
class Choice:
    """The baseline a run is compared with, and how its speed-ups are judged."""

    baseline: ResultsFile
    rule: SpeedupRule
    candidates: tuple[ResultsFile, ...]  # every baseline the folder (or the one file) offered

    def describe(self, current: ResultsFile, tolerances: Tolerances) -> str:
        if self.rule is SpeedupRule.SAME_CPU:
            return f"baseline: {self.baseline.path} (this CPU's: {machine(self.baseline.frame)})"
        frame = self.baseline.frame
        held = int((held_rows(frame, tolerances) & frame["speedup"].notna().to_numpy()).sum())
        offered = "; ".join(f"{machine(c.frame)} ({c.path.name})" for c in self.candidates)
        folder = self.baseline.path.parent
        return (f"no baseline for this CPU ({machine(current.frame)}) among: {offered}\n"
                f"accuracy and MACs against {self.baseline.path}; speed-ups not compared with another CPU's: "
                f"the {held} rows saving >= {tolerances.share_floor:.0%} of MACs by heads or the class-token block "
                f"must keep a speed-up of 1 + {tolerances.speedup_share:g} x their saving\n"
                f"to make this CPU's baseline: rerun the same benchmark 3 times on it, one after another, then\n"
                f"  amg baseline RUN1.csv RUN2.csv RUN3.csv --into {folder}   (writes {baseline_file_name(current.frame)})")


def _baseline_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.csv") if not p.name.startswith("."))
        if not files:
            raise ReportError(f"baseline folder {path} has no CSV baseline in it")
        return files
    return [path]


def choose(baseline_path: str | Path, current: ResultsFile) -> Choice:
    """The baseline for `current` in `baseline_path` (a baseline CSV, or a folder of them, one per CPU)."""
    candidates = tuple(read_for_gate(path) for path in _baseline_files(Path(baseline_path)))
    by_machine: dict[Machine, ResultsFile] = {}
    for candidate in candidates:
        other = by_machine.setdefault(machine_of(candidate.frame), candidate)
        if other is not candidate:
            raise ReportError(f"{other.path} and {candidate.path} are both baselines for {machine(candidate.frame)}: "
                              "keep one per CPU model and thread count")
    same_cpu = by_machine.get(machine_of(current.frame))
    if same_cpu is not None:
        return Choice(same_cpu, SpeedupRule.SAME_CPU, candidates)
    return Choice(candidates[0], SpeedupRule.MACS_SHARE, candidates)


def gate(baseline_path: str | Path, current_path: str | Path, tolerances: Tolerances = Tolerances(),
         allow_mismatch: bool = False, keep_passing: bool = False) -> GateResult:
    """Read the run and its baseline (a file, or the run's CPU's in a folder) and compare them
    (`compare`). Raises `ReportError` naming the file for unreadable input."""
    current = read_for_gate(current_path)
    choice = choose(baseline_path, current)
    result = compare(choice.baseline, current, tolerances, allow_mismatch, choice.rule, keep_passing)
    return dataclasses.replace(result, basis=choice.describe(current, tolerances))


def _check_reruns(runs: Sequence[ResultsFile]) -> list[dict[tuple, dict[str, str]]]:
    """Each run keyed, after checking that they are reruns of one benchmark on one machine."""
    if len(runs) < MIN_RERUNS:
        raise InputError(f"a baseline is made from at least {MIN_RERUNS} reruns on one CPU, got {len(runs)}: "
                         "one run shows its own intervals, not how far a rerun drifts")
    first = runs[0]
    seen: dict[str, Path] = {}
    for run in runs:
        run_id = run.rows[0]["run_id"]
        if run_id in seen:  # one run twice would narrow the interval to its own: not how reruns drift
            raise ReportError(f"{run.path} and {seen[run_id]} are one run ({run_id}), not reruns: "
                              "give each rerun once")
        seen[run_id] = run.path
        if (distinct_text(run.frame, "run_status") == INTERRUPTED).any():  # read_csv checked its spelling
            raise ReportError(f"{run.path} is an interrupted run: it cannot go into a baseline (measure it again)")
        if machine_of(run.frame) != machine_of(first.frame):
            raise ReportError(f"{run.path} was made on {machine(run.frame)}, {first.path} on {machine(first.frame)}: "
                              "a baseline is one CPU model's")
        differences = mismatches(first.frame, run.frame)
        if differences:
            raise ReportError(f"{run.path} was not made under the conditions of {first.path}: {'; '.join(differences)}")
    keyed = [index_rows(run.rows, str(run.path)) for run in runs]  # two rows of one key are refused
    for run, rows in zip(runs, keyed):
        if rows.keys() != keyed[0].keys():
            absent = sorted(keyed[0].keys() ^ rows.keys())
            raise ReportError(f"{run.path} and {first.path} measured other configurations: "
                              + ", ".join("/".join(map(str, key)) for key in absent[:5]))
        for key, row in rows.items():
            for column in _EQUAL_IN_EVERY_RERUN:
                ours, theirs = parse_number(row.get(column)), parse_number(keyed[0][key].get(column))
                if ours != theirs:
                    raise ReportError(f"{run.path} and {first.path} disagree on {column} of {'/'.join(map(str, key))} "
                                      f"({theirs} vs {ours}): reruns of one benchmark compute the same model")
    return keyed


def _numbers(rows: Sequence[Mapping[str, str]], column: str) -> list[float]:
    return [number for number in (parse_number(row.get(column)) for row in rows) if number is not None]


def combine(runs: Sequence[ResultsFile]) -> list[dict[str, str]]:
    """One baseline from reruns of one benchmark on one CPU: each row is the first run's, with the
    reruns' median speed-up and latencies, and a speed-up interval spanning every rerun's, so that
    the gate's "wholly below the baseline's interval" rule sees how far reruns drift."""
    keyed = _check_reruns(runs)
    run_ids = "+".join(dict.fromkeys(run.rows[0]["run_id"] for run in runs))
    combined = []
    for key, first in keyed[0].items():
        reruns = [rows[key] for rows in keyed]
        row = {**first, "run_id": run_ids}
        for center, low, high in _SPEEDUP_TRIPLES:
            centers, lows, highs = (_numbers(reruns, column) for column in (center, low, high))
            if centers:
                row[center] = statistics.median(centers)
            if lows and highs:
                row[low], row[high] = min(lows), max(highs)
        for column in _LATENCY_COLUMNS:
            values = _numbers(reruns, column)
            if values:
                row[column] = statistics.median(values)
        combined.append(row)
    return combined


def make_baseline(run_paths: Sequence[str | Path], out: str | Path) -> ResultsFile:
    """Write the baseline `combine` makes of the runs at `run_paths` to `out`, atomically, and
    return it; `out` may be a baseline folder, where it is named after the runs' CPU
    (`baseline_file_name`)."""
    rows = combine([read_csv(path) for path in run_paths])
    frame = frame_of_rows(rows, COLUMNS)
    out = Path(out)
    if out.is_dir():
        out = out / baseline_file_name(frame)
    return ResultsFile(write_text_atomic(out, csv_text(rows)), frame)
