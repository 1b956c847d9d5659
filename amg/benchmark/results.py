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
import io
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

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


BASELINES_DIR = "baselines"  # results/baselines/ holds the gate's references, not device reports


def find_csvs(results_dir: str | Path) -> list[Path]:
    """Every report under `results_dir/<device>/` (temporary files and gate baselines excluded)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportError(f"results folder not found: {root}")
    return sorted(p for p in root.glob("*/*.csv") if not p.name.startswith(".") and p.parent.name != BASELINES_DIR)
