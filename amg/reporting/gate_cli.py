"""`amg gate`: its command line and what it prints (the rules are `amg.reporting.gate`'s, the
choice of baseline `amg.reporting.baselines`').

Exit codes of `main`: 0 pass, 1 regression or missing, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

from tabulate import tabulate

from amg.benchmark.results import KEY_COLUMNS, ReportError
from amg.reporting.baselines import gate
from amg.reporting.gate import ACCURACY_METRICS, MACS_METRIC, OK, SPEEDUP_METRIC, Finding, GateResult, SpeedupRule, Tolerances

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) >= 1000:
        return str(int(value))
    return f"{value:.4g}"


def _format_change(finding: Finding, rule: SpeedupRule) -> str:
    if finding.baseline is None or finding.current is None:
        return "-"
    if finding.metric == SPEEDUP_METRIC and rule is SpeedupRule.MACS_SHARE:
        return "-"  # its "baseline" is the bar the rule sets, not a measurement
    delta = finding.current - finding.baseline
    if finding.metric in ACCURACY_METRICS:
        return f"{delta:+.4f}"
    if finding.baseline == 0:
        return f"{delta:+.4g}"
    relative = f"{delta / abs(finding.baseline):+.2%}"
    if finding.metric == MACS_METRIC:  # exact counts: a change of 1 MAC must not read as +0.00%
        return f"{delta:+.0f} ({relative})"
    return relative


def summary_line(result: GateResult) -> str:
    checked = f"{result.configurations} configurations, {result.metrics_checked} metrics checked"
    if result.passed:
        return f"PASS: {checked}"
    return f"FAIL: {len(result.regressions)} regressions, {len(result.missing)} missing ({checked})"


def format_findings(result: GateResult, verbose: bool = False) -> str:
    """Which baseline was used and why, a table of every finding that is not "ok" (all of them
    with `verbose`), the notes on passing rows (new or contended configurations), and a one-line
    PASS / FAIL summary."""
    shown = [f for f in result.findings if verbose or f.verdict != OK]
    notes = [f for f in result.findings if not verbose and f.verdict == OK and f.note]
    parts = []
    if result.mismatches:
        parts.append("compared although the runs differ (--allow-mismatch):\n"
                     + "\n".join(f"  {line}" for line in result.mismatches))
    if result.basis:
        parts.append(result.basis)
    if result.baseline_machine != result.current_machine:
        # Accuracy and MACs still compare when both ran the same model file and stored plans;
        # the reader should know that the two runs come from two different machines.
        parts.append(f"baseline made on: {result.baseline_machine}\n"
                     f"current made on:  {result.current_machine}")
    if shown:
        headers = ["config", "backend", "precision", "batch", "metric", "baseline", "current", "change", "verdict", "note"]
        table = [[*(f.key if f.key else ("-",) * len(KEY_COLUMNS)), f.metric, _format_value(f.baseline),
                  _format_value(f.current), _format_change(f, result.speedup_rule), f.verdict, f.note] for f in shown]
        parts.append(tabulate(table, headers=headers, tablefmt="github"))
    if notes:
        parts.append("\n".join(["notes:"] + [f"  {'/'.join(map(str, f.key))}: {f.note}" for f in notes]))
    parts.append(summary_line(result))
    return "\n\n".join(parts)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def build_parser(prog: str = "amg gate") -> argparse.ArgumentParser:
    defaults = Tolerances()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare a benchmark CSV with a committed baseline. Speed-ups are compared only with a "
                    "baseline made on the same CPU model and thread count; give a folder of baselines (one per "
                    "CPU, made by `amg baseline` from reruns) and the run's is chosen. On a CPU without one, "
                    "accuracy and MACs are compared with the first baseline and every configuration saving "
                    "enough MACs on heads or the class-token block must keep a speed-up of 1 + a share of "
                    "its saving. Exit 0: pass; 1: a regression or a missing configuration/metric; "
                    "2: usage or input error.",
    )
    parser.add_argument("--baseline", required=True, metavar="FILE|DIR",
                        help="committed baseline CSV, or a folder of them, one per CPU model and thread count")
    parser.add_argument("--current", required=True, metavar="FILE", help="CSV of the run to check")
    parser.add_argument("--accuracy-drop", type=_tolerance, default=defaults.accuracy_drop, metavar="X",
                        help=f"largest allowed absolute drop of a 0..1 accuracy metric (default {defaults.accuracy_drop:g})")
    parser.add_argument("--speedup-drop", type=_tolerance, default=defaults.speedup_drop, metavar="X",
                        help="same CPU: largest allowed relative drop of the in-run speed-up, below 1, for rows "
                             f"without confidence intervals (default {defaults.speedup_drop:g})")
    parser.add_argument("--speedup-min-drop", type=_tolerance, default=defaults.speedup_min_drop, metavar="X",
                        help="same CPU, with intervals on both sides: a speed-up regresses when the run's 95%% "
                             "interval lies below the baseline's and it lost more than this fraction "
                             f"(default {defaults.speedup_min_drop:g})")
    parser.add_argument("--speedup-share", type=_tolerance, default=defaults.speedup_share, metavar="X",
                        help="CPU without a baseline: the share of a configuration's MACs saving its speed-up "
                             f"must keep (default {defaults.speedup_share:g}: speed-up >= 1 + X x saving)")
    parser.add_argument("--share-floor", type=_tolerance, default=defaults.share_floor, metavar="X",
                        help="CPU without a baseline: the smallest MACs saving held to --speedup-share "
                             f"(default {defaults.share_floor:g})")
    parser.add_argument("--macs-change", type=_tolerance, default=defaults.macs_change, metavar="X",
                        help=f"largest allowed relative change of MACs, either way (default {defaults.macs_change:g})")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare runs made with another device id, thread count, input size or backends "
                             "(refused otherwise, exit 2)")
    parser.add_argument("--verbose", action="store_true", help="list the passing checks too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2
    try:
        tolerances = Tolerances(args.accuracy_drop, args.macs_change, args.speedup_drop, args.speedup_min_drop,
                                args.speedup_share, args.share_floor)
    except ValueError as error:
        parser.error(str(error))
    try:
        result = gate(args.baseline, args.current, tolerances, args.allow_mismatch, keep_passing=args.verbose)
    except ReportError as error:
        print(f"amg gate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_findings(result, verbose=args.verbose))
    return EXIT_PASS if result.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
