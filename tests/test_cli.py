"""The `amg` command end to end on tiny generated data: synth, info, train, eval, import, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from amg.cli import main
from amg.errors import InputError
from amg.model.vit import load_model

TINY = ["--ids", "6", "--test-ids", "3", "--images-per-id", "6", "--cameras", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "synth"
    assert main(["data", "synth", "--out", str(root), *TINY]) == 0
    return root


def test_help_explains_the_commands():
    result = subprocess.run([sys.executable, "-m", "amg.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("data", "train", "eval", "import"):
        assert command in result.stdout
    assert "AMG_CACHE_DIR" in result.stdout


def test_data_info_prints_every_split(tiny_root, capsys):
    assert main(["data", "info", str(tiny_root)]) == 0
    out = capsys.readouterr().out
    assert "query_occluded" in out and "gallery" in out and "train" in out


def test_missing_dataset_is_a_usage_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_market"
    assert main(["data", "info", str(missing)]) == 2
    assert "no_such_market" in capsys.readouterr().err


def test_train_then_eval_on_given_data(tiny_root, tmp_path, capsys):
    model_path = tmp_path / "tiny.pt"
    assert main(["train", "--data", str(tiny_root), "--out", str(model_path), "--steps", "3",
                 "--batch-ids", "3", "--batch-instances", "2", "--img-size", "64", "32"]) == 0
    capsys.readouterr()
    assert load_model(model_path).config.img_size == (64, 32)
    assert main(["eval", str(model_path), "--data", str(tiny_root), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"query", "occluded"}
    for metrics in results.values():
        assert set(metrics) >= {"rank1", "rank5", "mAP", "mINP", "queries"}
        assert 0 <= metrics["mAP"] <= 1


def test_train_can_store_weights_as_fp16(tiny_root, tmp_path, capsys):
    path = tmp_path / "half.pt"
    assert main(["train", "--data", str(tiny_root), "--out", str(path), "--steps", "1", "--weights-dtype",
                 "fp16", "--batch-ids", "3", "--batch-instances", "2", "--img-size", "64", "32"]) == 0
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    assert all(p.dtype == torch.float32 for p in load_model(path).parameters())
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        main(["train", "--weights-dtype", "fp8"])
    assert usage.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_train_on_data_needs_out(tiny_root, capsys):
    assert main(["train", "--data", str(tiny_root)]) == 2
    assert "--out" in capsys.readouterr().err


def test_import_transreid_checkpoint(tmp_path, capsys):
    from amg.model.vit import build_model

    source = build_model("small", img_size=(64, 32)).eval()
    state = {("base." + k[9:] if k.startswith("backbone.") else k.replace("neck.", "bottleneck.")): v
             for k, v in source.state_dict().items()}
    pth = tmp_path / "transformer_120.pth"
    torch.save(state, pth)
    out = tmp_path / "imported.pt"
    assert main(["import", str(pth), "--preset", "small", "--img-size", "64", "32", "--out", str(out)]) == 0
    assert "retrieval feature: the class token before the BN neck" in capsys.readouterr().err  # TransReID's TEST.NECK_FEAT
    images = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(load_model(out).eval()(images), source.forward_tokens(images)[:, 0])
    assert main(["import", str(pth), "--preset", "small", "--img-size", "64", "32", "--out", str(out),
                 "--neck-feat", "after"]) == 0
    with torch.no_grad():
        assert torch.equal(load_model(out).eval()(images), source(images))


@pytest.fixture(scope="module")
def model_path(tiny_root, tmp_path_factory):
    """A tiny model trained by `amg train` (2 steps: these tests exercise commands, not accuracy)."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    assert main(["train", "--data", str(tiny_root), "--out", str(path), "--steps", "2",
                 "--batch-ids", "3", "--batch-instances", "2", "--img-size", "64", "32"]) == 0
    return path


def test_prune_then_flops_and_eval(tiny_root, model_path, tmp_path, capsys):
    pruned = tmp_path / "pruned.pt"
    plan_json = tmp_path / "plan.json"
    assert main(["prune", "--model", str(model_path), "--data", str(tiny_root), "--heads", "0.25",
                 "--tokens", "0.25", "--calibration-images", "8", "--out", str(pruned),
                 "--plan-out", str(plan_json)]) == 0
    err = capsys.readouterr().err
    assert "calibration 8/8 images" in err  # progress while scoring
    plan = json.loads(plan_json.read_text())
    assert plan["policy"] == {"heads": "amg", "tokens": "amg", "allocation": "global"}
    assert main(["flops", str(pruned)]) == 0
    table = capsys.readouterr().out
    saved = float(table.split("GMACs / image")[1].split("|")[3].strip().rstrip("%"))
    assert saved > 0
    # the unpruned model against itself saves nothing: the reference has the same classifier
    assert main(["flops", str(model_path), "--reach"]) == 0
    table = capsys.readouterr().out
    assert [line.split("|")[4].strip() for line in table.splitlines() if line.startswith("| parameters")
            or line.startswith("| GMACs")] == ["0.0%", "0.0%"]
    reach = {line.split("|")[1].strip(): float(line.split("|")[2].strip().rstrip("%"))
             for line in table.split("MACs saved at most")[1].splitlines()[2:] if line.startswith("|")}
    assert 0 < reach["tokens"] < reach["heads (keep-one)"] < reach["heads (global)"] < 100
    assert main(["eval", str(pruned), "--data", str(tiny_root), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"query", "occluded"}
    # against itself: no difference, an interval of width 0
    assert main(["eval", str(pruned), "--data", str(tiny_root), "--against", str(pruned), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["occluded"]["mAP"]["difference"] == 0 and same["occluded"]["mAP"]["ci95"] == [0, 0]
    assert main(["eval", str(pruned), "--data", str(tiny_root), "--against", str(model_path)]) == 0
    table = capsys.readouterr().out
    assert "paired bootstrap over the queries" in table and "95% interval" in table
    assert sum(1 for line in table.splitlines() if line.startswith("| occluded")) == 2  # Rank-1 and mAP


def test_prune_refuses_bad_ratio(tiny_root, tmp_path, capsys):
    assert main(["prune", "--model", "vit_tiny", "--data", str(tiny_root), "--heads", "1.0",
                 "--head-policy", "random", "--out", str(tmp_path / "x.pt")]) == 2
    assert "ratio must be in [0, 1)" in capsys.readouterr().err


def test_iterative_prune_from_the_command_line(tiny_root, model_path, tmp_path, capsys):
    out = tmp_path / "iter.pt"
    assert main(["prune", "--model", str(model_path), "--data", str(tiny_root), "--heads", "0.34",
                 "--iterative-rounds", "2", "--finetune-steps", "1", "--calibration-images", "6",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "round 2/2" in err
    from amg.model.pruned import load_pruned

    assert "iterative x2" in load_pruned(out).plan.policy["schedule"]


def test_prune_to_a_macs_saving(tiny_root, model_path, tmp_path, capsys):
    out = tmp_path / "target.pt"
    assert main(["prune", "--model", str(model_path), "--data", str(tiny_root), "--macs-saving", "0.2",
                 "--saving-by", "heads", "--calibration-images", "6", "--out", str(out)]) == 0
    from amg.model.pruned import load_pruned

    assert load_pruned(out).plan.ratios["target_macs_saving"] == 0.2
    assert main(["prune", "--model", str(model_path), "--data", str(tiny_root), "--macs-saving", "0.2",
                 "--heads", "0.2", "--out", str(out)]) == 2
    assert "--macs-saving chooses the ratios" in capsys.readouterr().err


def test_prune_with_fine_tuning_to_a_macs_saving(tiny_root, model_path, tmp_path, capsys):
    from amg.model.pruned import load_pruned

    out = tmp_path / "tuned.pt"
    assert main(["prune", "--model", str(model_path), "--data", str(tiny_root), "--macs-saving", "0.15",
                 "--saving-by", "heads", "--finetune", "2", "--calibration-images", "6", "--out", str(out)]) == 0
    plan = load_pruned(out).plan
    assert plan.policy["schedule"] == "one-shot + 2 fine-tune steps, distilled"
    assert plan.ratios["target_macs_saving"] == 0.15
    assert main(["prune", "--model", str(model_path), "--data", str(tiny_root), "--heads", "0.2", "--finetune", "2",
                 "--iterative-rounds", "2", "--out", str(out)]) == 2
    assert "choose one" in capsys.readouterr().err


def test_only_bad_input_exits_2_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import amg.cli.commands as commands

    def bad_input(args):
        raise InputError("--batch must be >= 1, got 0")

    def bug(args):
        raise RuntimeError("onnxruntime output differs from PyTorch")

    monkeypatch.setattr(commands, "cmd_flops", bad_input)
    assert main(["flops"]) == 2
    assert "amg flops: error: --batch must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(commands, "cmd_flops", bug)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        main(["flops"])


def test_eval_can_use_the_feature_before_the_neck(tiny_root, model_path, capsys):
    assert main(["eval", str(model_path), "--data", str(tiny_root), "--json", "--neck-feat", "before"]) == 0
    captured = capsys.readouterr()
    assert "the class token before the BN neck" in captured.err and json.loads(captured.out)["query"]["queries"] > 0
    with pytest.raises(SystemExit):
        main(["eval", str(model_path), "--neck-feat", "middle"])


def test_train_refuses_to_overwrite_an_unfinished_runs_checkpoint_without_resume(tiny_root, tmp_path, capsys):
    out = tmp_path / "m.pt"
    (tmp_path / "m.pt.resume").write_bytes(b"a checkpoint")
    assert main(["train", "--data", str(tiny_root), "--out", str(out), "--steps", "2", "--batch-ids", "3",
                 "--batch-instances", "2", "--img-size", "64", "32"]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_root), "--out", str(out), "--steps", "2", "--batch-ids", "3",
                 "--batch-instances", "2", "--img-size", "64", "32", "--resume"]) == 2
    assert "cannot be read" in capsys.readouterr().err and not out.exists()
