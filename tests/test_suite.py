"""The suite's cases and rows, end to end on a tiny trained model: measure -> CSV -> gate."""

from __future__ import annotations

import dataclasses

import pytest

from amg.data.layout import load_dataset
from amg.data.synthetic import SynthConfig, generate
from amg.finetune import TrainConfig
from amg.gate import gate
from amg.results import COLUMNS, read_csv, write_csv
from amg.suite import PROFILES, UNPRUNED, Case, PruneSpec, Suite, build_cases
from amg.zoo import train_on_dataset

DATA = SynthConfig(train_ids=6, test_ids=3, images_per_id=6, num_cameras=3, queries_per_id=2,
                   distractors=1, junk=1, height=64, width=32, seed=5)
TINY_PROFILE = dataclasses.replace(PROFILES["quick"], paired_rounds=3, rounds=3)


def test_profiles_expand_to_unique_cases_with_the_unpruned_reference():
    for name, profile in PROFILES.items():
        cases = build_cases(profile)
        assert len({c.id for c in cases}) == len(cases), name
        assert any(c.spec == UNPRUNED for c in cases)
    quick = build_cases(PROFILES["quick"])
    assert [c.spec.config_id for c in quick] == [
        "unpruned", "heads0.25:amg", "heads0.25:random", "tokens0.25:amg", "tokens0.25:random",
        "heads0.25:amg+tokens0.25:amg"]
    custom = build_cases(PROFILES["quick"], ratios=[0.5], policies=["tome"], backends=["onnxruntime"], batches=[4])
    assert [c.id for c in custom] == ["unpruned-onnxruntime-fp32-b4", "tokens0.5:tome-onnxruntime-fp32-b4"]


def test_config_ids_name_allocation_and_both_axes():
    assert PruneSpec(heads=0.5, allocation="per-block").config_id == "heads0.5:amg/per-block"
    assert PruneSpec(heads=0.25, tokens=0.25, token_policy="random").config_id == "heads0.25:amg+tokens0.25:random"


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite") / "synth"
    generate(root, DATA)
    dataset = load_dataset(root)
    model, _ = train_on_dataset("small", dataset, TrainConfig(steps=3, num_identities=3, num_instances=2,
                                                              warmup_steps=1), img_size=(64, 32))
    return Suite(model, "tiny", TINY_PROFILE, dataset, threads=1, progress=lambda message: None)


def test_measured_rows_fill_the_schema_and_survive_the_csv(tiny_suite, tmp_path):
    rows = []
    for spec in (UNPRUNED, PruneSpec(heads=0.34, tokens=0.25)):
        case = Case(spec, "cpu", 2)
        runner = tiny_suite.runner(case)
        rows.append(tiny_suite.measure(case, runner, [0.002, 0.003, 0.004]))
    unpruned, pruned = rows
    assert "speedup" not in unpruned  # no speed-up is invented for the reference itself
    assert pruned["speedup"] > 0 and 0 < pruned["macs_saving"] < 1
    assert pruned["peak_rss_mb"] > pruned["forward_rss_mb"] > 0
    assert 0 <= pruned["occluded_mAP"] <= 1 and pruned["dataset"] == "synthetic"
    assert unpruned["latency_median_ms"] == pytest.approx(3.0)
    assert set(unpruned) <= set(COLUMNS)
    path = write_csv(rows, tmp_path, unpruned["device_id"], unpruned["run_id"])
    written = read_csv(path).rows
    assert [r["config_id"] for r in written] == ["unpruned", "heads0.34:amg+tokens0.25:amg"]
    assert int(written[1]["macs"]) == pruned["macs"]
    assert gate(path, path).passed


def test_injected_slowdown_really_slows_the_runner():
    import time

    from amg.measure.backends import Runner
    from amg.suite import slowed

    def work():
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass

    fast = Runner(work, None, "cpu")
    start = time.perf_counter()
    slowed(fast, 2.0)()
    assert time.perf_counter() - start >= 0.019
    with pytest.raises(ValueError, match="factor"):
        slowed(fast, 0.5)
