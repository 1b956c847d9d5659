"""`amg report`: every benchmark CSV under a results folder -> one README.md of tables, plots
and pictures.

A one-screen summary first (`summary`), then each configuration's newest measurement on each
device in one section per device (`tables`), a cross-device speed-up table, two accuracy-vs-cost plots (`pareto`), the
equal-MACs comparison (`equal_macs`) and the attention pictures (`pictures`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from amg.benchmark.results import INTERRUPTED
from amg.files import write_text_atomic
from amg.reporting.equal_macs import section as equal_macs_section
from amg.reporting.loading import csvs_under, load_reports, newest_per_configuration
from amg.reporting.pareto import AXIS_LABELS, LATENCY_PLOT, MACS_PLOT, plot_pareto
from amg.reporting.pictures import draw_records
from amg.reporting.precision import section as precision_section
from amg.reporting.runtimes import section as runtimes_section
from amg.reporting.summary import section as summary_section
from amg.reporting.tables import cross_device_table, device_table, markdown_text


def _accuracy_metric(frame: pd.DataFrame) -> str:
    # The occluded set is the point of this project; holistic Rank-1 when none was evaluated.
    return "occluded_rank1" if frame["occluded_rank1"].notna().any() else "query_rank1"


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _sources(frame: pd.DataFrame, latest: pd.DataFrame, root: Path) -> list[str]:
    """The header of the README: when, from what, and which runs are shown."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    files, shown = frame["source"].nunique(), latest["source"].nunique()
    lines = [
        f"Generated {now} from {files} CSV file(s) under {markdown_text(root)}; "
        f"each configuration's newest measurement on each device is shown ({shown} file(s)):",
        "",
    ]
    runs = latest.groupby(["device_id", "run_id", "source"], sort=True)
    for (device, run, source), rows in runs:
        stamp = rows["timestamp"].max()
        interrupted = " **(interrupted run: not every configuration was measured)**" \
            if (rows["run_status"] == INTERRUPTED).any() else ""
        # CSV-derived text is escaped, not put in code spans: a backtick in a file name would end the span
        lines.append(f"- {markdown_text(_relative(source, root))}: run {markdown_text(run)} of {markdown_text(device)}, "
                     f"{markdown_text(stamp) if stamp else 'no timestamp'}{interrupted}")
    return lines


def _device_section(latest: pd.DataFrame, device: str) -> list[str]:
    first = latest[latest["device_id"] == device].iloc[0]
    facts = [first["device_name"], f"{first['threads']:.0f} threads" if pd.notna(first["threads"]) else ""]
    facts += [f"torch {first['torch_version']}" if first["torch_version"] else "", first["os"]]
    facts += [f"git {first['git_revision']}" if first["git_revision"] else ""]
    return [f"## {markdown_text(device)}", "", " · ".join(markdown_text(f) for f in facts if f), "",
            device_table(latest, device), ""]


def _readme(frame: pd.DataFrame, latest: pd.DataFrame, root: Path, accuracy: str) -> str:
    lines = ["# Benchmark report", ""] + summary_section(latest) + _sources(frame, latest, root) + [""]
    for device in sorted(latest["device_id"].unique()):
        lines += _device_section(latest, device)
    lines += [
        "## Speed-up across devices",
        "",
        "Unpruned median latency / configuration median latency, timed interleaved in the same "
        "run on each device and backend: above 1.00 pruning pays there.",
        "",
        cross_device_table(latest),
        "",
        "## Accuracy against cost",
        "",
        f"Accuracy is {AXIS_LABELS[accuracy]}; the line through each series is its Pareto front.",
        "",
        f"![{accuracy} vs latency]({LATENCY_PLOT})",
        "",
        f"![{accuracy} vs GMACs]({MACS_PLOT})",
        "",
    ]
    return "\n".join(lines)


def build_report(results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Read every CSV under `results_dir`, write `out_dir`/README.md and PNG plots.

    Each configuration's newest measurement per device is reported, and the attention pictures
    of every model the suite recorded (amg.reporting.pictures). Every file is written atomically. Returns the
    written paths (README first). No CSV found raises `ReportError` naming the folder.
    """
    root, out = Path(results_dir), Path(out_dir)
    frame = load_reports(csvs_under(root))
    latest = newest_per_configuration(frame)
    accuracy = _accuracy_metric(latest)
    plots = [
        plot_pareto(latest, out, "latency_median_ms", accuracy, LATENCY_PLOT),
        plot_pareto(latest, out, "gmacs", accuracy, MACS_PLOT),
    ]
    pictures = draw_records(root, out)
    text = "\n".join([_readme(frame, latest, root, accuracy), runtimes_section(latest), precision_section(latest),
                       equal_macs_section(latest), _pictures_section(pictures, out)])
    readme = write_text_atomic(out / "README.md", text)
    return [readme, *plots, *(path for _, paths in pictures for path in paths)]


def _pictures_section(pictures: list, out: Path) -> str:
    if not pictures:
        return ""
    lines = ["## What AMG removes", "",
             "Per model: attention entropy of every head of the unpruned model on the calibration images "
             "(AMG removes high-entropy heads; × marks removed ones), and the key/value positions the AMG "
             "token plan keeps in a few blocks over a sample query image (static: the same for every image).", ""]
    for record, paths in pictures:
        lines += [f"### {markdown_text(record.model)} ({markdown_text(Path(record.checkpoint).name)})", ""]
        lines += [f"![{path.stem}]({path.relative_to(out)})" for path in paths] + [""]
    return "\n".join(lines)
