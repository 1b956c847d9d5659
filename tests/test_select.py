"""`amg select`: the most accurate configuration whose measured latency fits, and the frontier."""

from __future__ import annotations

import pytest

from amg.benchmark.results import write_csv
from amg.cli import main
from amg.reporting.loading import load_reports
from amg.reporting.select import PAIRED, NoMeasurements, Target, candidates, select

DEVICE = "board-4c"
RUN, OLDER = "20261125T100000Z-aaaaaa", "20261120T100000Z-bbbbbb"


def _row(config, median_ms, speedup, mAP, run=RUN, batch=1, backend="cpu", stamp="2026-11-25T10:00:00Z", **extra):
    return {"run_id": run, "timestamp": stamp, "device_id": DEVICE, "backend": backend, "precision": "fp32",
            "batch": batch, "model": "small", "checkpoint": "default", "config_id": config,
            "latency_median_ms": median_ms, "speedup": speedup, "macs_saving": 0.1, "dataset": "synthetic",
            "query_mAP": mAP, "occluded_mAP": mAP / 2, **extra}


@pytest.fixture()
def results(tmp_path):
    # Paired latency = 10 ms (unpruned median of the run) / speed-up; the medians drift on purpose.
    rows = [_row("unpruned", 10.0, None, 0.80), _row("heads0.25:amg", 7.0, 1.25, 0.75),
            _row("heads0.25:random", 9.5, 1.25, 0.70), _row("heads0.5:amg", 9.0, 2.0, 0.60),
            _row("tokens0.5:tome", 8.0, 0.9, 0.79)]
    write_csv(rows, tmp_path, DEVICE, RUN)
    # An older run of the same configuration does not count; one of another batch neither.
    write_csv([_row("heads0.25:amg", 1.0, 10.0, 0.99, run=OLDER, stamp="2026-11-20T10:00:00Z"),
               _row("unpruned", 1.0, None, 0.99, run=OLDER, stamp="2026-11-20T10:00:00Z", batch=32)],
              tmp_path, DEVICE, OLDER)
    return tmp_path


def test_paired_latency_puts_every_configuration_on_the_newest_unpruned_median(results, tmp_path):
    # a later run measured only the unpruned model, 20% slower (a busier machine)
    write_csv([_row("unpruned", 12.0, None, 0.80, run="20261126T000000Z-cccccc", stamp="2026-11-26T00:00:00Z")],
              results, DEVICE, "20261126T000000Z-cccccc")
    frame = candidates(load_reports(results), Target(DEVICE, "cpu"))
    paired = dict(zip(frame["config_id"], frame[PAIRED]))
    assert paired["unpruned"] == pytest.approx(12.0)
    assert paired["heads0.25:amg"] == pytest.approx(12.0 / 1.25)
    assert paired["tokens0.5:tome"] == pytest.approx(12.0 / 0.9)


def test_best_accuracy_within_the_budget_from_the_newest_measurements(results):
    target = Target(DEVICE, "cpu", batch=1)
    chosen = select(load_reports(results), target, budget_ms=8.5).chosen
    assert chosen["config_id"] == "heads0.25:amg"  # 8 ms paired; the older run's 0.99 is superseded
    assert chosen["query_mAP"] == pytest.approx(0.75)
    assert select(load_reports(results), target, budget_ms=5.5).chosen["config_id"] == "heads0.5:amg"
    assert select(load_reports(results), target, budget_ms=20).chosen["config_id"] == "unpruned"
    # by each configuration's own median instead: tome (8 ms) fits 8.5 ms and is more accurate
    by_median = select(load_reports(results), target, budget_ms=8.5, latency="median")
    assert by_median.chosen["config_id"] == "tokens0.5:tome"


def test_frontier_drops_dominated_configurations(results):
    selection = select(load_reports(results), Target(DEVICE, "cpu"), budget_ms=8.5, metric="occluded_mAP")
    front = list(selection.front["config_id"])
    assert "heads0.25:random" not in front  # as fast as heads0.25:amg (8 ms), less accurate
    assert front == ["heads0.5:amg", "heads0.25:amg", "unpruned"]


def test_nothing_fits_and_bad_input_are_explained(results):
    frame = load_reports(results)
    selection = select(frame, Target(DEVICE, "cpu"), budget_ms=1.0)
    assert selection.chosen is None and selection.fastest_ms == pytest.approx(5.0)
    with pytest.raises(NoMeasurements, match="cuda fp32 batch 1 on board-4c"):
        select(frame, Target(DEVICE, "cuda"), budget_ms=5)
    with pytest.raises(ValueError, match="unknown accuracy metric"):
        select(frame, Target(DEVICE, "cpu"), budget_ms=5, metric="rank1")
    with pytest.raises(ValueError, match="budget must be > 0"):
        select(frame, Target(DEVICE, "cpu"), budget_ms=0)


def test_accuracy_from_different_data_sets_is_refused(tmp_path):
    market = {"model": "vit_small", "dataset": "market1501"}
    write_csv([_row("unpruned", 10.0, None, 0.8), _row("unpruned", 30.0, None, 0.9, **market),
               _row("heads0.25:amg", 28.0, 1.2, 0.85, **market)], tmp_path, DEVICE, RUN)
    with pytest.raises(ValueError, match="different data sets"):
        select(load_reports(tmp_path), Target(DEVICE, "cpu"), budget_ms=20)
    assert select(load_reports(tmp_path), Target(DEVICE, "cpu", model="small"), budget_ms=20).chosen is not None


def test_cli_prints_the_frontier_and_exits_by_whether_anything_fits(results, capsys):
    base = ["select", "--backend", "cpu", "--device-id", DEVICE, "--results-dir", str(results)]
    assert main(base + ["--budget-ms", "8.5"]) == 0
    out = capsys.readouterr().out
    assert "chosen: heads0.25:amg" in out and "| *  |" in out.replace("|    |", "")
    assert main(base + ["--budget-ms", "1"]) == 1
    assert "nothing fits 1 ms: the fastest measured configuration takes 5.000 ms" in capsys.readouterr().out
    assert main(base[:2] + ["cuda"] + base[3:] + ["--budget-ms", "5"]) == 2
    assert "--amg-backends cuda" in capsys.readouterr().err  # says how to measure it


@pytest.mark.parametrize("config_id, command", [
    ("heads0.25:amg", "amg prune --heads 0.25 --head-policy amg --out pruned.pt"),
    ("heads0.5:amg/per-block+tokens0.5:random",
     "amg prune --heads 0.5 --head-policy amg --allocation per-block --tokens 0.5 --token-policy random --out pruned.pt"),
    ("save0.2:heads:amg/per-block@ft300",
     "amg prune --macs-saving 0.2 --saving-by heads --head-policy amg --allocation per-block --finetune 300 "
     "--out pruned.pt"),
    ("save0.3:heads:amg+tokens:amg@it3x300",
     "amg prune --macs-saving 0.3 --saving-by both --head-policy amg --token-policy amg --iterative-rounds 3 "
     "--finetune-steps 75 --out pruned.pt"),
    ("save0.4:tokens:tome", "amg prune --macs-saving 0.4 --saving-by tokens --token-policy tome --out pruned.pt"),
    ("save0.2:heads:random~s2@ft300",
     "amg prune --macs-saving 0.2 --saving-by heads --head-policy random --seed 2 --finetune 300 --out pruned.pt"),
    ("unpruned", None), ("heads=0.25,tokens=0", None),
])
def test_the_chosen_configuration_comes_with_the_command_that_makes_it(config_id, command):
    from amg.reporting.select import prune_command

    assert prune_command(config_id) == command
    if command:
        assert prune_command(config_id, "m.pt").startswith("amg prune --model m.pt ")
        from amg.cli import build_parser

        build_parser().parse_args(command.split()[1:])  # the CLI takes it (exits 2 otherwise)


def test_a_choice_timed_under_contention_comes_with_a_warning(tmp_path):
    from amg.reporting.select import summary

    rows = [_row("unpruned", 10.0, None, 0.80), _row("heads0.25:amg", 7.0, 1.25, 0.75, other_cpu_share=0.4),
            _row("heads0.5:amg", 9.0, 2.0, 0.60, other_cpu_share=0.01)]
    write_csv(rows, tmp_path, DEVICE, RUN)
    target = Target(DEVICE, "cpu", batch=1)
    busy = summary(select(load_reports(tmp_path), target, budget_ms=8.5))
    assert "warning: heads0.25:amg was timed while other processes took 40% of the CPU" in busy
    quiet = summary(select(load_reports(tmp_path), target, budget_ms=5.5))
    assert "chosen: heads0.5:amg" in quiet and "warning" not in quiet


@pytest.mark.parametrize("column, value", [("latency_median_ms", "-3"), ("latency_median_ms", "inf"),
                                           ("speedup", "0"), ("query_mAP", "85")])
def test_a_measurement_out_of_range_is_an_input_error_not_a_choice(results, capsys, column, value):
    """A -3 ms median would be "chosen" under any budget; inf would be rendered as a latency."""
    path = next(results.glob(f"{DEVICE}/{RUN}.csv"))
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index(column)] = value
    lines[2] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    code = main(["select", "--backend", "cpu", "--device-id", DEVICE, "--results-dir", str(results), "--budget-ms", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and f"line 3: {column} '{value}'" in err and str(path) in err
