"""Bad input at the edges gets a clear error that names it (exit 2 on the command line), never
a silent wrong number; text from CSVs cannot inject Markdown, HTML or shell commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data_layout import make_msmt
from test_pictures import CONFIG as RECORD_CONFIG
from test_pictures import _plan

from amg.benchmark.attention_record import save_record
from amg.benchmark.results import ReportError, write_csv
from amg.cli import main
from amg.data.layout import DatasetError, load_dataset
from amg.errors import InputError
from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan
from amg.model.vit import CHECKPOINT_FORMAT, build_model, load_model, save_model
from amg.reporting.pictures import draw_records
from amg.reporting.report import build_report
from amg.reporting.select import prune_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, expected", [
    (["flops", "--batch", "0"], "'0' is not a whole number >= 1"),
    (["train", "--lr", "inf"], "'inf' is not a finite number > 0"),
    (["import", "x.pth", "--preset", "small", "--out", "y.pt", "--num-classes", "-5"], "'-5' is not a whole number >= 0"),
    (["select", "--budget-ms", "nan", "--backend", "cpu"], "'nan' is not a finite number > 0"),
    (["prune", "--calibration-images", "0", "--out", "p.pt"], "'0' is not a whole number >= 1"),
    (["prune", "--head-policy", "foo", "--out", "p.pt"], "invalid choice: 'foo'"),
    (["data", "synth", "--out", "x", "--seed", "-1"], "'-1' is not a whole number >= 0"),
    (["train", "--seed", "-1"], "'-1' is not a whole number >= 0"),
])
def test_out_of_range_options_are_usage_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("fields, message", [
    ({"num_heads": 0}, "must be >= 1"),
    ({"embed_dim": 50, "num_heads": 6}, "embed_dim 50 is not divisible by num_heads 6"),
    ({"img_size": (8, 64)}, "must be two sides of at least one patch"),
])
def test_model_configs_that_cannot_build_are_named(fields, message):
    with pytest.raises(InputError, match=message):
        ModelConfig("bad", **fields)


@pytest.mark.parametrize("overrides, num_classes", [({"num_cameras": 10**10}, 0), ({}, 10**10)])
def test_a_small_file_whose_camera_table_or_classifier_needs_more_memory_is_refused(tmp_path, overrides, num_classes):
    path = tmp_path / "huge.pt"
    config = {"name": "small", "img_size": (64, 32), "embed_dim": 64, "depth": 2, "num_heads": 2, **overrides}
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "num_classes": num_classes, "state_dict": {}}, path)
    with pytest.raises(InputError, match=r"needs about \d+\.\d GiB, more than the"):
        load_model(path)


@pytest.mark.parametrize("config, message", [({"depth": 6.5}, "depth must be whole numbers, got depth=6.5"),
                                             ({"img_size": (64.5, 32)}, "img_size must be whole numbers")])
def test_a_model_file_with_fractional_shapes_is_refused_by_name(tmp_path, config, message):
    path = tmp_path / "odd.pt"
    config = {"name": "small", "img_size": (64, 32), "embed_dim": 64, "depth": 2, "num_heads": 2, **config}
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "num_classes": 0, "state_dict": {}}, path)
    with pytest.raises(InputError, match=message):
        load_model(path)


def test_integer_values_for_float_weights_are_refused_not_cast(tmp_path):
    model = build_model("small", img_size=(64, 32))
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    key = "backbone.blocks.0.attn.qkv.weight"
    payload["state_dict"][key] = payload["state_dict"][key].to(torch.int64)
    torch.save(payload, path)
    with pytest.raises(InputError, match=f"integer values for float weights \\(1\\): {key}: checkpoint torch.int64"):
        load_model(path)


def test_a_camera_the_sie_model_has_no_embedding_for_is_named():
    """A 2-camera SIE model on 6-camera data: an error naming the camera, not an index error."""
    from amg.model.vit import build_model

    model = build_model("small", img_size=(64, 32), num_cameras=2).eval()
    with pytest.raises(InputError, match=r"camera id 5 is outside this model's camera embedding \(SIE\) of 2"):
        model(torch.zeros(2, 3, 64, 32), torch.tensor([0, 5]))
    assert model(torch.zeros(2, 3, 64, 32), torch.tensor([0, 1])).shape == (2, 192)


def test_a_small_file_asking_for_more_memory_than_there_is_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.pt"
    config = {"name": "huge", "img_size": (256, 128), "embed_dim": 65536, "depth": 64, "num_heads": 64}
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "num_classes": 0, "state_dict": {}}, path)
    assert path.stat().st_size < 10_000
    with pytest.raises(InputError, match=r"needs about \d+\.\d GiB, more than the"):
        load_model(path)


def test_an_output_that_is_a_folder_is_named(tmp_path, capsys):
    model = build_model("small")
    with pytest.raises(InputError, match="is a folder: give a file name"):
        save_model(model, tmp_path)
    with pytest.raises(InputError, match="is a folder: give a file name"):
        PrunePlan.unpruned(model.config).save(tmp_path)


def test_an_msmt17_list_entry_outside_the_data_root_is_refused(tmp_path):
    root = make_msmt(tmp_path)
    outside = root / "elsewhere" / "0002_000_03_0303morning_0871_0.jpg"  # beside the image folder, not in it
    outside.parent.mkdir()
    outside.write_bytes((root / "train" / "0002" / outside.name).read_bytes())
    (root / "list_val.txt").write_text(f"../elsewhere/{outside.name} 2\n")
    with pytest.raises(DatasetError, match="lies outside the image folder"):
        load_dataset(root)


def test_an_attention_record_with_a_plan_of_another_model_is_refused(tmp_path):
    import numpy as np

    from amg.benchmark.attention_record import AttentionRecord

    record = AttentionRecord("tiny", "default", (32, 16), (4, 2), 8, [[1.0] * 4] * 3,
                             {"heads0.25:amg": _plan(heads=[[0, 1, 2]] * 3).to_dict()})
    deeper = PrunePlan.unpruned(ModelConfig("deep", img_size=(32, 16), patch_size=8, embed_dim=32, depth=12,
                                            num_heads=4))
    deeper.policy = {"heads": "amg", "tokens": "none"}
    record.plans["heads0.5:amg"] = deeper.to_dict()
    save_record(record, np.zeros((32, 16, 3), dtype=np.uint8), tmp_path)
    with pytest.raises(ReportError, match="plan 'heads0.5:amg' is for 12 blocks x 4 heads, the record's model has 3 x 4"):
        draw_records(tmp_path, tmp_path / "out")
    assert RECORD_CONFIG.depth == 3


def test_text_from_a_csv_cannot_inject_markdown_or_html_into_the_report(tmp_path):
    hostile = "Box\n![x](http://evil/x.png) <img src=x onerror=alert(1)> | cell"
    write_csv([{"run_id": "r", "timestamp": "2026-11-25T00:00:00Z", "device_id": "d", "device_name": hostile,
                "backend": "cpu", "precision": "fp32", "batch": 1, "model": "tiny", "checkpoint": "default",
                "config_id": "unpruned<b>", "head_ratio": 0, "token_ratio": 0, "macs": 10, "gmacs": 1e-8,
                "latency_median_ms": 1.0}], tmp_path / "results", "d", "r")
    readme = build_report(tmp_path / "results", tmp_path / "report")[0].read_text()
    assert not re.search(r"(?<!\\)<(img|b)\b", readme) and "![x]" not in readme  # no live tag or image
    # one line (the newline did not end the cell or the paragraph), everything escaped, still readable
    assert "Box \\!\\[x\\](http://evil/x.png) \\<img src=x onerror=alert(1)\\> \\| cell" in readme


def test_the_printed_prune_command_is_shell_quoted():
    command = prune_command("heads0.25:amg", "x.pt; touch /tmp/owned")
    assert command == "amg prune --model 'x.pt; touch /tmp/owned' --heads 0.25 --head-policy amg --out pruned.pt"


def test_eval_reports_queries_without_a_gallery_match(tmp_path, capsys):
    from conftest import TINY_DATA

    from amg.data.synthetic import generate

    root = tmp_path / "synth"
    generate(root, TINY_DATA)
    query = sorted((root / "query").glob("*.jpg"))[0]
    pid = query.name.split("_")[0]
    for image in (root / "bounding_box_test").glob(f"{pid}_*.jpg"):
        image.unlink()  # its identity is gone from the gallery: the query cannot be scored
    model = build_model("small", img_size=(TINY_DATA.height, TINY_DATA.width))
    path = save_model(model, tmp_path / "m.pt")
    assert main(["eval", str(path), "--data", str(root), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["query"]["without_match"] >= 1
    assert "have no match in the gallery and are not scored" in captured.err


@pytest.mark.parametrize("options, message", [
    (["--amg-batches", "0"], "every batch size must be >= 1"),
    (["--amg-results-dir", "pyproject.toml"], "cannot hold the report"),
    (["--amg-policies", "foo"], "unknown policy(ies) ['foo']"),
    (["--amg-inject-slowdown", "nope=2"], "no case of this run measures ['nope']"),
    (["--amg-inject-slowdown", "unpruned=0.5"], "the factor must be a finite number >= 1"),
])
def test_the_suite_refuses_bad_options_before_measuring(options, message):
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/test_suite.py", "--collect-only", "-q",
                             "-p", "no:cacheprovider", "--amg-profile", "quick", *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stdout + result.stderr


CI_MODEL = str(ROOT / "results" / "baselines" / "ci-model.pt")


@pytest.mark.parametrize("options, message", [
    (["--amg-checkpoint", "{bad}"], "--amg-checkpoint: cannot read checkpoint"),
    (["--amg-checkpoint", CI_MODEL, "--amg-plans", "{bad}"], "--amg-plans: plan folder"),
    (["--amg-checkpoint", CI_MODEL, "--amg-data", "{folder}"], "--amg-data: "),
])
def test_an_input_the_suite_cannot_use_stops_the_run_in_one_line(tmp_path, options, message):
    """Not an error per case with a traceback: one line naming the option, exit 4 (a usage error)."""
    bad = tmp_path / "not-it.csv"
    bad.write_text("a,b\n1,2\n")
    options = [option.format(bad=bad, folder=tmp_path) for option in options]
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/test_suite.py", "-q", "-x", "-p", "no:cacheprovider",
                             "--amg-profile", "quick", "--amg-backends", "cpu", "--amg-no-report", *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 4 and message in output and "Traceback" not in output, output[-2000:]


def test_prune_refuses_an_output_folder_before_any_work(tmp_path, capsys):
    assert main(["prune", "--model", "vit_tiny", "--heads", "0.25", "--head-policy", "random",
                 "--out", str(tmp_path / "p.pt"), "--plan-out", str(tmp_path)]) == 2
    assert "--plan-out" in capsys.readouterr().err and not (tmp_path / "p.pt").exists()


def test_a_plan_that_says_a_ratio_and_removes_nothing_is_refused():
    from amg.pruning.planner import check_plan_removes

    config = ModelConfig("small", img_size=(64, 32), embed_dim=64, depth=2, num_heads=2)
    before = PrunePlan.unpruned(config)
    nothing = PrunePlan.unpruned(config)
    nothing.ratios = {"heads": 0.0001, "tokens": 0.0}
    with pytest.raises(InputError, match="a head ratio of 0.0001 removes no head of this model"):
        check_plan_removes(before, nothing)
    nothing.ratios = {"heads": 0.0, "tokens": 0.001}
    nothing.kept_tokens = [list(range(config.num_tokens))] * config.depth  # every position kept, spelt out
    with pytest.raises(InputError, match="a token ratio of 0.001 removes no token"):
        check_plan_removes(before, nothing)
    some = PrunePlan.unpruned(config)
    some.kept_heads = [[0], [0, 1]]
    some.ratios = {"heads": 0.25, "tokens": 0.0}
    check_plan_removes(before, some)
