"""The suite's cases and rows, end to end on a tiny trained model: measure -> CSV -> gate."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from amg.benchmark.profiles import PROFILES, UNPRUNED, Case, PruneSpec, build_cases
from amg.benchmark.results import COLUMNS, write_csv
from amg.benchmark.results_file import read_csv
from amg.benchmark.suite import Suite
from amg.reporting.baselines import gate

TINY_PROFILE = dataclasses.replace(PROFILES["quick"], paired_rounds=3, rounds=3)


def test_profiles_expand_to_unique_cases_with_the_unpruned_reference():
    for name, profile in PROFILES.items():
        cases = build_cases(profile)
        assert len({c.id for c in cases}) == len(cases), name
        assert any(c.spec == UNPRUNED for c in cases)
    quick = build_cases(PROFILES["quick"], last_block="full")
    assert [c.spec.config_id for c in quick] == [
        "unpruned", "heads0.25:amg", "heads0.25:random", "tokens0.25:amg", "tokens0.25:random",
        "heads0.25:amg+tokens0.25:amg"]
    # by default every configuration has the class-token last block, next to the full unpruned reference
    assert [c.spec.config_id for c in build_cases(PROFILES["quick"])] == ["unpruned", "cls-block"] + [
        f"{c.spec.config_id}+cls-block" for c in quick[1:]]
    both = build_cases(PROFILES["quick"], last_block="both")
    assert len(both) == 2 * len(quick) and both[:len(quick)] == quick
    custom = build_cases(PROFILES["quick"], ratios=[0.5], policies=["tome"], backends=["onnxruntime"], batches=[4])
    # ToMe chooses tokens from every row of every block: it keeps the whole last block
    assert [c.id for c in custom] == ["unpruned-onnxruntime-fp32-b4", "cls-block-onnxruntime-fp32-b4",
                                      "tokens0.5:tome-onnxruntime-fp32-b4"]
    with pytest.raises(ValueError, match="last block"):
        build_cases(PROFILES["quick"], last_block="half")


def test_config_ids_name_allocation_and_both_axes():
    assert PruneSpec(heads=0.5, allocation="per-block").config_id == "heads0.5:amg/per-block"
    assert PruneSpec(heads=0.25, tokens=0.25, token_policy="random").config_id == "heads0.25:amg+tokens0.25:random"


@pytest.fixture(scope="module")
def tiny_suite(tiny_trained):
    dataset, model = tiny_trained
    return Suite(copy.deepcopy(model), "tiny", TINY_PROFILE, dataset, threads=1, progress=lambda message: None)


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
    assert unpruned["feature"] == pruned["feature"] == "after"
    assert unpruned["query_unmatched"] == 0 and unpruned["occluded_unmatched"] == 0  # counted, none here
    assert set(unpruned) <= set(COLUMNS)
    path = write_csv(rows, tmp_path, unpruned["device_id"], unpruned["run_id"])
    written = read_csv(path).rows
    assert [r["config_id"] for r in written] == ["unpruned", "heads0.34:amg+tokens0.25:amg"]
    assert int(written[1]["macs"]) == pruned["macs"]
    assert gate(path, path).passed


def test_the_class_token_block_saves_macs_and_time_at_the_same_accuracy(tiny_suite):
    rows = {}
    for spec in (UNPRUNED, PruneSpec(class_token_block=True), PruneSpec(heads=0.34),
                 PruneSpec(heads=0.34, class_token_block=True)):
        case = Case(spec, "cpu", 2)
        rows[spec.config_id] = tiny_suite.measure(case, tiny_suite.runner(case), [0.002, 0.003])
    full, fast = rows["unpruned"], rows["cls-block"]
    assert (full["last_block"], fast["last_block"]) == ("full", "class-token")
    assert fast["macs"] < full["macs"] and fast["macs_saving"] > 0 and fast["speedup"] > 0
    pruned, combined = rows["heads0.34:amg"], rows["heads0.34:amg+cls-block"]
    assert combined["macs_saving"] > pruned["macs_saving"]  # both savings, over the full unpruned model
    assert combined["head_ratio"] == pruned["head_ratio"]  # the same plan
    for metric in ("query_mAP", "occluded_mAP", "occluded_rank1"):  # lossless
        assert fast[metric] == full[metric] and combined[metric] == pruned[metric]
    assert tiny_suite.query_values["heads0.34:amg+cls-block"] == tiny_suite.query_values["heads0.34:amg"]


def test_injected_slowdown_really_slows_the_runner():
    import time

    from amg.benchmark.suite import slowed
    from amg.measure.backends import Runner

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


def test_saving_specs_name_their_method_and_schedule():
    from amg.pruning.schedule import Schedule

    spec = PruneSpec(saving=0.3, by="both", allocation="per-block", schedule=Schedule("finetune", 300))
    assert spec.config_id == "save0.3:heads:amg/per-block+tokens:amg@ft300"
    assert PruneSpec(saving=0.2, by="tokens", token_policy="tome").config_id == "save0.2:tokens:tome"
    assert PruneSpec(schedule=Schedule("finetune", 300)).config_id == "unpruned@ft300"
    assert spec.uses_heads and spec.uses_tokens and spec.needs_data
    assert not PruneSpec(saving=0.2, by="heads", head_policy="random").needs_data
    with pytest.raises(ValueError, match="needs `by`"):
        PruneSpec(saving=0.2)
    with pytest.raises(ValueError, match="not both"):
        PruneSpec(heads=0.2, saving=0.2, by="heads")


def test_equal_macs_profile_and_precisions():
    study = build_cases(PROFILES["equal-macs"])
    ids = [c.spec.config_id for c in study]
    assert len(set(c.id for c in study)) == len(study)
    assert {"unpruned", "unpruned@ft300", "save0.3:heads:amg+tokens:amg@ft300", "save0.2:heads:random",
            "save0.4:tokens:tome@ft300", "save0.2:heads:amg+tokens:amg@it3x300"} <= set(ids)
    assert {c.batch for c in study} == {1, 32}
    with pytest.raises(ValueError, match="ratios do not apply"):
        build_cases(PROFILES["equal-macs"], ratios=[0.5])
    tome_only = build_cases(PROFILES["equal-macs"], policies=["tome"], batches=[1])
    assert {c.spec.config_id for c in tome_only} == {"unpruned", "unpruned@ft300"} | {
        f"save{s:g}:tokens:tome{suffix}" for s in (0.1, 0.2, 0.3, 0.4) for suffix in ("", "@ft300")} - {
        "save0.1:tokens:tome@ft300"}
    default = build_cases(PROFILES["default"])
    assert {c.precision for c in default if c.backend == "cpu"} == {"fp32"}
    assert {c.precision for c in default if c.backend == "cuda"} == {"fp32", "fp16", "bf16"}
    explicit = build_cases(PROFILES["quick"], precisions=["bf16"])
    assert {(c.backend, c.precision) for c in explicit} == {("cpu", "bf16")}


def test_fine_tuned_configurations_are_trained_once_then_cached(tiny_suite, tmp_path, monkeypatch):
    from amg.pruning.macs_target import OutOfReach
    from amg.pruning.schedule import Schedule

    monkeypatch.setenv("AMG_CACHE_DIR", str(tmp_path / "cache"))
    spec = PruneSpec(saving=0.15, by="heads", schedule=Schedule("finetune", 2))
    case = Case(spec, "cpu", 1)
    row = tiny_suite.measure(case, tiny_suite.runner(case), [0.002, 0.003])
    assert row["schedule"] == "one-shot + 2 fine-tune steps, distilled"
    assert row["macs_saving"] == pytest.approx(0.15, abs=0.03) and 0 < row["head_ratio"] < 1
    assert isinstance(row["load_avg_1min"], float) and row["load_avg_1min"] >= 0  # Linux always has one
    assert len(list((tmp_path / "cache" / "pruned").glob("*.pt"))) == 1
    again = dataclasses.replace(tiny_suite, rows=[])  # new pruned models, the same cache
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(again.pruned(spec)(x), tiny_suite.pruned(spec)(x))  # loaded, not retrained
    with pytest.raises(OutOfReach, match="out of reach by tokens"):
        tiny_suite.pruned(PruneSpec(saving=0.5, by="tokens"))


def test_attention_record_is_saved_for_the_report(tiny_suite, tmp_path):
    from amg.benchmark.attention_record import load_record

    tiny_suite.pruned(PruneSpec(heads=0.34, tokens=0.25))
    path = tiny_suite.save_attention_record(tmp_path)
    record = load_record(path.parent)
    assert "heads0.34:amg+tokens0.25:amg" in record.plans
    assert len(record.entropy) == tiny_suite.model.config.depth
    assert (path.parent / "sample.png").is_file()


def test_config_ids_read_back_as_their_configurations():
    for profile in PROFILES.values():
        for case in build_cases(profile):
            assert PruneSpec.from_config_id(case.spec.config_id) == case.spec, case.spec.config_id
    for unknown in ("heads=0.25,tokens=0", "save0.2:heads:amg@ft0", "heads0.25:amg@warm", "save:heads:amg",
                    "heads0.250:amg", "save0.2:unpruned"):
        assert PruneSpec.from_config_id(unknown) is None, unknown


def test_reports_written_before_the_feature_column_still_read(tmp_path):
    """`feature` came after reports were committed: an older file without it reads as empty."""
    row = {"run_id": "r", "timestamp": "t", "device_id": "d", "backend": "cpu", "precision": "fp32",
           "batch": 1, "config_id": "unpruned", "feature": "before"}
    path = write_csv([row], tmp_path, "d", "r")
    lines = path.read_text().splitlines()
    column = lines[0].split(",").index("feature")
    older = tmp_path / "older.csv"
    older.write_text("\n".join(",".join(v for i, v in enumerate(line.split(",")) if i != column)
                               for line in lines) + "\n")
    assert read_csv(path).rows[0]["feature"] == "before" and read_csv(older).rows[0]["feature"] == ""


def test_int8_rows_carry_the_quantized_models_accuracy_and_its_speed_up_over_fp32(tiny_suite):
    from amg.measure.backends import availability

    if availability("onnxruntime"):
        pytest.skip(availability("onnxruntime"))
    spec = PruneSpec(heads=0.34, tokens=0.25)
    fp32_case, int8_case = Case(spec, "onnxruntime", 1), Case(spec, "onnxruntime", 1, "int8")
    fp32 = tiny_suite.measure(fp32_case, tiny_suite.runner(fp32_case), [0.002, 0.003])
    int8 = tiny_suite.measure(int8_case, tiny_suite.runner(int8_case), [0.002, 0.003])
    assert fp32["accuracy_of"] == "pytorch fp32" and int8["accuracy_of"] == "onnxruntime int8"
    assert fp32["output_max_diff"] <= 1e-4 and int8["output_max_diff"] > fp32["output_max_diff"]
    assert 0.9 <= int8["output_cosine"] <= 1 and "fp32_speedup" not in fp32
    assert int8["fp32_speedup"] > 0
    assert int8["fp32_speedup_ci_low"] <= int8["fp32_speedup"] <= int8["fp32_speedup_ci_high"]
    assert 0 <= int8["occluded_mAP"] <= 1
    # evaluated through ONNX Runtime's INT8 model, not copied from PyTorch's
    assert (int8["occluded_mAP"], int8["query_mAP"]) != (fp32["occluded_mAP"], fp32["query_mAP"]) or \
        int8["output_max_diff"] > 0
    assert tiny_suite._accuracy[(spec, "onnxruntime", "int8")] is not tiny_suite._accuracy[spec]


def test_profiles_spanning_models_and_batches_per_backend():
    deploy = build_cases(PROFILES["deploy"])
    assert {c.model for c in deploy} == {"vit_small", "vit_base", "transreid_base"}
    assert {(c.backend, c.batch) for c in deploy} == {("cpu", 1), ("onnxruntime", 1), ("openvino", 1), ("openvino", 8)}
    assert {c.spec.saving for c in deploy} == {0.0, 0.1, 0.2, 0.3} and all(c.precision == "fp32" for c in deploy)
    assert deploy[0].id == "vit_small-unpruned-cpu-fp32-b1"
    one = build_cases(PROFILES["deploy"], models=["vit_base"], batches=[2])
    assert {c.model for c in one} == {"vit_base"} and {c.batch for c in one} == {2}
    assert build_cases(PROFILES["quick"], models=["vit_base"])[0].id == "vit_base-unpruned-cpu-fp32-b1"
    int8 = build_cases(PROFILES["int8"])
    assert {(c.backend, c.precision) for c in int8} == {("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                                       ("openvino", "fp32"), ("openvino", "int8")}


def test_a_case_of_another_preset_is_measured_on_that_presets_model_in_the_same_run(tiny_suite):
    other = tiny_suite.at(Case(UNPRUNED, "cpu", 1, model="vit_tiny"))
    assert other is not tiny_suite and other.model.config.name == "vit_tiny" and other.dataset is None
    assert other.rows is tiny_suite.rows and other.metadata is tiny_suite.metadata
    assert tiny_suite.at(Case(UNPRUNED, "cpu", 1, model="vit_tiny")) is other  # kept while its cases run
    assert tiny_suite.at(Case(UNPRUNED, "cpu", 1)) is tiny_suite
    assert tiny_suite.at(Case(UNPRUNED, "cpu", 1, model=tiny_suite.model.config.name)) is tiny_suite
