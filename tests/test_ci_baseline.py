"""What CI's gate rests on: the committed model, its stored plans and the baseline agree, and
the gate fails the regressions it exists for against that very baseline.

CI measures the committed model with the committed plans, so nothing it gates on depends on
the CPU it runs on (training and gradient scoring do: see the README, "CI and the gate").
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from amg.benchmark.plan_store import PlanStore
from amg.benchmark.profiles import PROFILES, UNPRUNED, build_cases
from amg.benchmark.results import read_csv
from amg.measure.flops import count_macs
from amg.model.pruned import apply_plan, load_pruned
from amg.reporting.gate import Tolerances, compare
from amg.train.cache import model_fingerprint

BASELINES = Path(__file__).resolve().parents[1] / "results" / "baselines"
CI_MODEL = BASELINES / "ci-model.pt"
CI_PLANS = BASELINES / "ci-plans"
CI_BASELINE = BASELINES / "ci-python-2core.csv"
CI_PROFILE = "ci"


@pytest.fixture(scope="module")
def ci_model():
    return load_pruned(CI_MODEL)


@pytest.fixture(scope="module")
def stored_plans(ci_model):
    store, fingerprint = PlanStore(CI_PLANS), model_fingerprint(ci_model)
    # plans belong to the pruning: a configuration with the class-token block measures the same plan
    specs = {case.spec.pruning for case in build_cases(PROFILES[CI_PROFILE]) if case.spec.prunes}
    return {spec.config_id: store.load(spec.config_id, ci_model.config, fingerprint) for spec in specs}


@pytest.fixture(scope="module")
def baseline_rows():
    return read_csv(CI_BASELINE).rows


def test_every_ci_configuration_has_a_plan_stored_for_the_ci_model(stored_plans):
    missing = [config_id for config_id, plan in stored_plans.items() if plan is None]
    assert not missing, f"CI would plan these anew on its own CPU: {missing}"


def test_the_stored_plans_cost_exactly_the_baselines_macs(ci_model, stored_plans, baseline_rows):
    rows = {row["config_id"]: row for row in baseline_rows}
    specs = {case.spec for case in build_cases(PROFILES[CI_PROFILE])}
    assert set(rows) == {spec.config_id for spec in specs}
    assert count_macs(ci_model).total == int(rows["unpruned"]["macs"])
    for spec in specs - {UNPRUNED}:
        pruned = copy.deepcopy(ci_model)
        if spec.prunes:
            apply_plan(pruned, copy.deepcopy(stored_plans[spec.pruning.config_id]))
        pruned.use_class_token_last_block(spec.class_token_block)
        assert count_macs(pruned).total == int(rows[spec.config_id]["macs"]), spec.config_id


def test_the_baseline_names_the_cpu_that_made_it(baseline_rows):
    assert all(row["device_name"] and row["device_name"] != "unknown" for row in baseline_rows)
    assert all(row["checkpoint"] == "results/baselines/ci-model.pt" for row in baseline_rows)


def _changed(rows: list[dict], target: dict, column: str, change) -> list[dict]:
    """`rows` with one row's `column` changed (a speed-up with its interval): the smallest
    regression CI must catch."""
    changed = copy.deepcopy(rows)
    row = next(row for row in changed if all(row[k] == target[k] for k in ("config_id", "backend", "batch")))
    for name in (column, "speedup_ci_low", "speedup_ci_high") if column == "speedup" else (column,):
        row[name] = str(change(float(row[name])))
    return changed


@pytest.mark.parametrize("column, change", [
    ("occluded_rank1", lambda value: value - 0.02),  # two points of occluded Rank-1
    ("query_mAP", lambda value: value - 0.02),
    ("macs", lambda value: int(value) + 1),  # any change of the count
    ("speedup", lambda value: value / 1.2),  # a configuration 20% slower than it was
])
def test_the_gate_fails_injected_regressions_against_the_committed_baseline(baseline_rows, column, change):
    assert compare(baseline_rows, baseline_rows).passed
    for row in baseline_rows:
        if row["config_id"] == "unpruned":
            continue
        result = compare(baseline_rows, _changed(baseline_rows, row, column, change))
        assert [(f.key[0], f.key[1], f.metric) for f in result.regressions] == [
            (row["config_id"], row["backend"], column)]


def test_the_gate_fails_when_pruning_buys_nothing_any_more(baseline_rows):
    """Losing the whole saving (a speed-up of 1.0, measured as tightly as the baseline's) must fail
    for every configuration that saves more than the gate's drift floor: the CI profile has
    several (the 50% plans); smaller savings lie inside the run-to-run drift and are gated on
    accuracy and MACs only."""
    lost = copy.deepcopy(baseline_rows)
    saving = [row for row in lost
              if row["speedup"] and float(row["speedup"]) * (1 - Tolerances().speedup_min_drop) > 1.0]
    assert len(saving) >= 2
    for row in saving:
        row.update(speedup="1.0", speedup_ci_low="0.99", speedup_ci_high="1.01")
    result = compare(baseline_rows, lost)
    assert sorted(f.key[:2] for f in result.regressions) == sorted((row["config_id"], row["backend"]) for row in saving)
