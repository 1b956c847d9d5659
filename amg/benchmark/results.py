"""The benchmark CSV: its columns, atomic writing, and validated reading.

One CSV per run per device, under `results/<device-id>/`, one row per (configuration,
backend, batch). Every row carries the device, the software versions and the git
revision, so a row read alone still says where it came from. Files are written to a
temporary name in the same folder, then hard-linked to the final name (which fails rather
than overwrite): a reader never sees half a file, and two runs writing at once each land
whole, under their own run id.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

from amg.benchmark.row_checks import check_row
from amg.errors import InputError
from amg.files import write_text_atomic

# The schema, in file order. Units are in the names; empty means "not measured".
IDENTITY_COLUMNS = [
    "run_id",  # one per pytest session, e.g. 20261125T140229Z-1a2b3c
    "run_status",  # complete | interrupted (SIGINT/SIGTERM, or recovered from a killed run's journal)
    "timestamp",  # ISO 8601 UTC
    "device_id",  # stable, file-system safe (amg.measure.device.device_id)
    "device_name",  # CPU model or GPU name, as the OS reports it
    "backend",  # cpu | cuda | jetson | rpi | torchscript | onnxruntime | openvino (amg.measure.backend_registry)
    "precision",  # fp32 | fp16 | bf16 (PyTorch autocast; OpenVINO's hint) | int8 (the runtime's quantization)
    "threads",  # torch / onnxruntime intra-op threads
    "batch",
    "model",  # preset name
    "checkpoint",  # model file, or "default" for the cached embedded default
    "input_size",  # HxW
    "feature",  # retrieval feature of the accuracy columns: the class token after | before the BN neck
    "config_id",  # stable name of the pruning configuration (gate key with backend and batch)
    "head_policy",
    "token_policy",
    "allocation",
    "schedule",  # one-shot | iterative xK ...
    "head_ratio",
    "token_ratio",
    "mlp_policy",  # none | taylor | magnitude | random
    "mlp_ratio",  # share of MLP hidden channels removed
    "last_block",  # class-token (computed for the class token only, lossless) | full
]
MEASURE_COLUMNS = [
    "params",
    "param_mb",
    "macs",  # fvcore multiply-adds per image, exact (fvcore's "flops" are MACs)
    "gmacs",  # the same in 1e9, for reading
    "macs_saving",  # 1 - gmacs / gmacs of the unpruned model
    "latency_median_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_rounds",
    "speedup",  # unpruned median / this median, interleaved in the same run
    "speedup_ci_low",  # 95% bootstrap interval of the speed-up over the interleaved pairs
    "speedup_ci_high",
    "latency_saving",  # 1 - 1 / speedup
    # rows at a reduced precision (int8, bf16, fp16): the unpruned fp32 model on the same backend
    # / this, interleaved in the same run: what the precision buys, alone (unpruned) or with pruning
    "fp32_speedup",
    "fp32_speedup_ci_low",
    "fp32_speedup_ci_high",
    # the machine's 1-minute load average when the row was measured (the run's own threads
    # included): well above the thread count, something else competed for the cores
    "load_avg_1min",
    # the share of the machine's CPU other processes took during the interleaved rounds behind
    # `speedup` (amg.measure.contention): above 0.1 the row was measured under contention
    "other_cpu_share",
    # the timed model's output against fp32 PyTorch on the timing input: largest |difference|
    # and smallest per-image cosine (fp32 exports must be within 1e-4; reduced precision >= 0.9)
    "output_max_diff",
    "output_cosine",
    "peak_rss_mb",  # CPU peak resident memory of an isolated process running this configuration
    "forward_rss_mb",  # of which the forward passes added (peak minus RSS after loading the model)
    "cuda_max_allocated_mb",
    "dataset",
    # whose accuracy: "pytorch fp32", or "<backend> <precision>" where a reduced precision was
    # evaluated as the runtime runs it (fp32 exports match PyTorch to 1e-4: they carry its numbers)
    "accuracy_of",
    "query_rank1",
    "query_rank5",
    "query_mAP",
    "query_mINP",
    "occluded_rank1",
    "occluded_rank5",
    "occluded_mAP",
    "occluded_mINP",
    "query_unmatched",  # queries with no match in the gallery: the protocol leaves them out of every metric
    "occluded_unmatched",
]
VERSION_COLUMNS = ["amg_version", "torch_version", "timm_version", "python_version", "os", "git_revision"]
COLUMNS = IDENTITY_COLUMNS + MEASURE_COLUMNS + VERSION_COLUMNS
TEXT_MEASURE_COLUMNS = ("dataset", "accuracy_of")  # the other measures are numbers
KEY_COLUMNS = ("config_id", "backend", "precision", "batch")
# Added after reports were already committed: older files lack them and read as empty.
OPTIONAL_COLUMNS = ("feature", "last_block", "run_status", "query_unmatched", "occluded_unmatched", "speedup_ci_low",
                    "speedup_ci_high", "load_avg_1min", "other_cpu_share", "output_max_diff", "output_cosine",
                    "accuracy_of", "fp32_speedup", "fp32_speedup_ci_low", "fp32_speedup_ci_high", "mlp_policy",
                    "mlp_ratio")
COMPLETE, INTERRUPTED = "complete", "interrupted"
JOURNAL_SUFFIX = ".journal"  # rows of a run in progress, one JSON line each: `.<run-id>.journal`
QUERIES_SUFFIX = ".queries"  # `.<run-id>.journal.queries`: {config_id: per-query values}, one line each

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ReportError(InputError):
    """A results file is missing, truncated, or does not follow the schema; names the file."""


def safe_name(text: str) -> str:
    """A file-system safe form of `text` (device ids, run ids): letters, digits, '.', '_', '-'."""
    cleaned = _SAFE.sub("-", text).strip("-.")
    if not cleaned:
        raise InputError(f"{text!r} has no character usable in a file name")
    return cleaned[:80]


def csv_cell(value: Any) -> str:
    """A row's value as the CSV holds it (None, NaN and infinities: empty, i.e. not measured)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.10g}" if math.isfinite(value) else ""  # NaN/inf: not measured
    return str(value)


def write_csv(rows: Iterable[Mapping[str, Any]], results_dir: str | Path, device: str, run_id: str) -> Path:
    """Write `rows` to `results_dir/<device>/<run_id>.csv` atomically; returns the path.

    Unknown keys in a row are an error (a typo would otherwise vanish); missing ones are
    written empty. An existing file of the same run is never overwritten.
    """
    rows = list(rows)
    if not rows:
        raise ReportError("no rows to write: nothing was measured")
    for row in rows:
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ReportError(f"row has columns outside the schema: {unknown}")
    path = Path(results_dir) / safe_name(device) / f"{safe_name(run_id)}.csv"
    try:
        write_text_atomic(path, csv_text(rows), replace=False)
    except FileExistsError as error:
        raise ReportError(f"{path} exists: each run writes its own file") from error
    return path


def csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """`rows` as the text of a results CSV, every column of the schema in file order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: csv_cell(row.get(column)) for column in COLUMNS})
    return buffer.getvalue()


@dataclass(frozen=True)
class ResultsFile:
    path: Path
    rows: list[dict[str, str]]


def read_csv(path: str | Path) -> ResultsFile:
    """Read and validate one results CSV (header, column set, complete rows, key fields)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"results file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    if not text.strip():
        raise ReportError(f"{path} is empty")
    if not text.endswith("\n"):
        raise ReportError(f"{path} is truncated: its last line is incomplete")
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as error:  # e.g. an unclosed quote swallowing the rest of the file
        raise ReportError(f"{path} is not a valid CSV: {error}") from error
    header = records[0]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:  # a second column of one name would hide the first from every reader
        raise ReportError(f"{path} has the column(s) {repeated} more than once")
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ReportError(f"{path} lacks columns {missing}")
    rows = []
    for line_number, values in enumerate(records[1:], start=2):
        if len(values) != len(header):
            raise ReportError(f"{path} line {line_number}: {len(values)} fields, header has {len(header)}")
        row = {**dict.fromkeys(OPTIONAL_COLUMNS, ""), **dict(zip(header, values))}
        empty_keys = [c for c in KEY_COLUMNS + ("device_id", "run_id") if not row[c]]
        if empty_keys:
            raise ReportError(f"{path} line {line_number}: empty {empty_keys}")
        try:
            check_row(row, f"{path} line {line_number}")
        except InputError as error:
            raise ReportError(str(error)) from None
        rows.append(row)
    if not rows:
        raise ReportError(f"{path} has a header but no rows")
    return ResultsFile(path, rows)


BASELINES_DIR = "baselines"  # results/baselines/ holds the gate's references, not device reports


def find_csvs(results_dir: str | Path) -> list[Path]:
    """Every report under `results_dir/<device>/` (temporary files and gate baselines excluded)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportError(f"results folder not found: {root}")
    return sorted(p for p in root.glob("*/*.csv") if not p.name.startswith(".") and p.parent.name != BASELINES_DIR)


def journal_path(results_dir: str | Path, device: str, run_id: str) -> Path:
    """Where a run appends its rows as it measures them (hidden: not a report until it ends)."""
    return Path(results_dir) / safe_name(device) / f".{safe_name(run_id)}{JOURNAL_SUFFIX}"


def queries_journal(journal: Path) -> Path:
    """Beside a run's journal: the per-query values of each configuration it evaluated, one JSON
    line each, so that a killed run's report keeps its per-query record too."""
    return journal.with_name(journal.name + QUERIES_SUFFIX)


def append_journal(path: Path, row: Mapping[str, Any]) -> None:
    """Add one measured row (or one configuration's per-query values) to a journal, on disk
    before the next case starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: v for k, v in row.items() if not (isinstance(v, float) and not math.isfinite(v))})
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def claim_journal(path: Path) -> IO[str]:
    """Create the run's (empty) journal holding a lock on it, and return the handle to keep open
    while the run lives: another run's `recover_journals` leaves a locked journal alone. The lock
    dies with the process, so a killed run's journal is free to recover. The file appears under
    its name already locked (made under another name, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = path.with_name(path.name + ".claim")
    handle = open(claim, "a", encoding="utf-8")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(claim, path)
    return handle


DAMAGED_SUFFIX = ".damaged"  # a journal no report can be made of, set aside for a person to look at


def recover_journals(results_dir: str | Path, warn=None) -> list[Path]:
    """Turn the journals of runs that were killed (no CSV written) into interrupted reports;
    returns the reports written. A journal whose report exists is only removed; the journal of
    a run still measuring (locked: `claim_journal`) is left alone. A journal whose rows are not
    the suite's (not JSON objects, columns outside the schema, values out of their range) is
    renamed `<journal>.damaged` and `warn(message)` is called: one damaged file must not stop
    every later run on the folder."""
    written = []
    for journal in sorted(Path(results_dir).glob(f"*/.*{JOURNAL_SUFFIX}")):
        if not journal.is_file():
            continue  # not a journal this project wrote
        with open(journal, encoding="utf-8") as handle:
            try:  # held until the journal is gone, so that no run can claim it meanwhile
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            run_id = journal.name[1:-len(JOURNAL_SUFFIX)]
            if not (journal.parent / f"{run_id}.csv").exists():
                try:
                    rows = _journal_rows(handle.read(), journal)
                    if rows:
                        report = write_csv(rows, results_dir, journal.parent.name, run_id)
                        _recover_query_record(journal, report)
                        written.append(report)
                except (InputError, UnicodeDecodeError) as error:
                    aside = journal.with_name(journal.name + DAMAGED_SUFFIX)
                    os.replace(journal, aside)
                    if warn is not None:
                        warn(f"set aside a damaged journal as {aside}: {error}")
                    continue
            journal.unlink()
            queries_journal(journal).unlink(missing_ok=True)
    return written


def _recover_query_record(journal: Path, report: Path) -> None:
    """The per-query record of a killed run, from its queries journal (a torn last line is left out)."""
    from amg.benchmark.query_record import save_query_record  # (a sibling that never imports this module)

    path = queries_journal(journal)
    if not path.is_file():
        return
    values = {}
    for _, entry in _journal_lines(path.read_text(encoding="utf-8")):
        if isinstance(entry, dict):
            values.update({k: v for k, v in entry.items() if isinstance(v, dict)})
    if values:
        save_query_record(report, values)


def _journal_rows(text: str, journal: Path) -> list[dict[str, Any]]:
    """The rows of a killed run's journal, as an interrupted run's; InputError for rows that are not the suite's."""
    rows = []
    for number, row in _journal_lines(text):
        if not isinstance(row, dict):
            raise InputError(f"{journal} line {number} is not a row (a JSON object)")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise InputError(f"{journal} line {number} has columns outside the schema: {unknown}")
        row = {**row, "run_status": INTERRUPTED}
        check_row({column: csv_cell(value) for column, value in row.items()}, f"{journal} line {number}")
        rows.append(row)
    return rows


def _journal_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each line of a journal, up to the first that does not parse:
    the line being written when the run was killed."""
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            return
