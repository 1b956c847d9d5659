"""`amg export`: deployable ONNX / OpenVINO artifacts with a manifest, faithful to PyTorch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import amg.benchmark.artifact as artifact
from amg.benchmark.artifact import MANIFEST, ExportRequest, export_model
from amg.cli import main
from amg.data.transforms import normalize
from amg.errors import InputError
from amg.measure.export import load_artifact
from amg.model.pruned import apply_plan, save_pruned
from amg.pruning.planner import make_plan


def _pruned(model):
    model = copy.deepcopy(model)
    return apply_plan(model, make_plan(model, heads=0.34, tokens=0.25, head_policy="random", token_policy="random"))


def _calibration(dataset, model):
    from amg.pruning.calibration import CalibrationImages

    return CalibrationImages.from_dataset(dataset, model.config.img_size, count=8).images


def _export(tiny_trained, out, fmt, precision="fp32", batch=0):
    dataset, model = tiny_trained
    model = _pruned(model)
    calibration = _calibration(dataset, model) if precision == "int8" else None
    return model, export_model(model, out, ExportRequest(fmt, precision, batch, threads=1), dataset, calibration,
                               "test", lambda message: None)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_fp32_export_matches_pytorch_and_its_manifest_says_so(tiny_trained, tmp_path, fmt):
    model, manifest = _export(tiny_trained, tmp_path / "out", fmt)
    written = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert written == manifest and (tmp_path / "out" / manifest["file"]).is_file()
    assert manifest["parity"]["max_abs_diff"] < 1e-4 and manifest["parity"]["images"] > 0
    for values in manifest["accuracy"]["query_sets"].values():  # the bound: within 0.1 point
        assert abs(values["difference"]["rank1"]) <= 1e-3 and abs(values["difference"]["mAP"]) <= 1e-3
    assert 0 < manifest["macs"] < manifest["macs_unpruned"] and manifest["plan"]["kept_heads"]
    assert manifest["inputs"][0]["name"] == "images" and manifest["inputs"][0]["shape"][0] == "batch"
    assert manifest["exporter"]["opset"] == 17 and "onnxruntime" in manifest["runtime_versions"]
    # a free batch axis: the artifact takes any batch
    features = load_artifact(tmp_path / "out" / manifest["file"], "fp32", threads=1)
    images = torch.rand(3, 3, *model.config.img_size)
    with torch.no_grad():
        assert torch.allclose(features(images, None), model(images), atol=1e-4)


def test_a_fixed_batch_export_has_that_batch(tiny_trained, tmp_path):
    _, manifest = _export(tiny_trained, tmp_path / "out", "onnx", batch=4)
    assert manifest["inputs"][0]["shape"][0] == 4 and manifest["outputs"][0]["shape"][0] == 4


@pytest.mark.parametrize("fmt, precision", [("onnx", "int8"), ("openvino", "int8"), ("openvino", "fp16")])
def test_reduced_precision_exports_state_their_accuracy_change(tiny_trained, tmp_path, fmt, precision):
    dataset, base = tiny_trained
    _, manifest = _export(tiny_trained, tmp_path / "out", fmt, precision)
    assert manifest["precision"] == precision and manifest["precision_detail"]
    assert 0 < manifest["parity"]["max_abs_diff"] and manifest["parity"]["min_cosine"] > 0.8
    for values in manifest["accuracy"]["query_sets"].values():
        change = values["exported"]["mAP"] - values["pytorch"]["mAP"]
        assert values["difference"]["mAP"] == pytest.approx(change)


def test_export_refuses_what_it_cannot_write(tiny_trained, tmp_path):
    with pytest.raises(InputError, match="ONNX Runtime's CPU provider computes an fp16 graph in fp32"):
        ExportRequest("onnx", "fp16")
    with pytest.raises(InputError, match="unknown export format 'tflite'"):
        ExportRequest("tflite")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        _export(tiny_trained, tmp_path / "taken", "onnx")
    assert (tmp_path / "taken" / "file").read_text() == "mine"


def test_an_interrupted_export_leaves_nothing_behind(tiny_trained, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _export(tiny_trained, tmp_path / "out", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_staging_folder_goes_with_the_next_export_a_live_ones_stays(tiny_trained, tmp_path):
    import fcntl

    killed, live = tmp_path / ".out.killed", tmp_path / ".out.live"
    for staging in (killed, live):
        staging.mkdir()
        (staging / artifact.STAGING_LOCK).write_text("")
        (staging / "model.onnx").write_bytes(b"x" * 1000)
    with open(live / artifact.STAGING_LOCK) as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # an export still writing it
        _export(tiny_trained, tmp_path / "out", "onnx")
        assert not killed.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.live", "out"]


def test_a_batch_beyond_memory_is_refused_before_tracing(tiny_trained, tmp_path):
    with pytest.raises(InputError, match=r"--batch 1000000000: tracing the model on it needs about .* GiB"):
        _export(tiny_trained, tmp_path / "out", "onnx", batch=10**9)
    assert list(tmp_path.iterdir()) == []


def test_the_export_command_writes_the_artifact_and_prints_the_accuracy(tiny_trained, tmp_path, capsys):
    dataset, model = tiny_trained
    path = save_pruned(_pruned(model), tmp_path / "pruned.pt")
    assert main(["export", str(path), "--format", "onnx", "--precision", "int8", "--calibration-images", "8",
                 "--data", str(dataset.root), "--out", str(tmp_path / "deploy"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "exported Rank-1" in out and str(tmp_path / "deploy" / "model.onnx") in out
    manifest = json.loads((tmp_path / "deploy" / MANIFEST).read_text())
    assert manifest["precision"] == "int8" and manifest["source"] == str(path)
    assert manifest["last_block"] == "class-token"  # on by default: the same features, fewer MACs
    assert main(["export", str(path), "--format", "onnx", "--full-last-block", "--data", str(dataset.root),
                 "--out", str(tmp_path / "full"), "--threads", "1"]) == 0
    full = json.loads((tmp_path / "full" / MANIFEST).read_text())
    assert full["last_block"] == "full" and full["macs"] > manifest["macs"]
    assert full["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("policy", ["tome", "evit"])
def test_dynamic_token_models_export_through_the_dynamo_exporter(tiny_trained, tmp_path, policy):
    dataset, model = tiny_trained
    merged = copy.deepcopy(model)
    apply_plan(merged, make_plan(merged, tokens=0.3, token_policy=policy))
    manifest = export_model(merged, tmp_path / "out", ExportRequest("onnx", batch=4), dataset, None, "test",
                            lambda message: None)
    assert "dynamo" in manifest["exporter"]["name"] and manifest["exporter"]["opset"] >= 18
    # The synthetic images' flat backgrounds give exactly equal patches: which of two tied tokens
    # ToMe merges (or EViT keeps) is the runtime's sort order, so features may move a little,
    # not the ranking.
    assert manifest["parity"]["min_cosine"] > 0.99
    for values in manifest["accuracy"]["query_sets"].values():
        assert abs(values["difference"]["mAP"]) <= 1e-3


def test_a_dynamic_model_that_does_not_export_is_refused_with_the_reason(tiny_trained, tmp_path, monkeypatch, capsys):
    dataset, model = tiny_trained
    merged = copy.deepcopy(model)
    apply_plan(merged, make_plan(merged, tokens=0.3, token_policy="tome"))
    path = save_pruned(merged, tmp_path / "tome.pt")

    def fails(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(artifact, "export_onnx", fails)
    assert main(["export", str(path), "--format", "onnx", "--data", str(dataset.root), "--out",
                 str(tmp_path / "x")]) == 2
    assert "the dynamic token policy 'tome' did not export (RuntimeError: unsupported operator)" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_features_of_a_fixed_batch_model_pad_the_last_chunk(tiny_trained):
    from amg.train.evaluate import extract_features, extract_fixed_batch_features

    _, model = tiny_trained
    images = torch.randint(0, 255, (5, 3, *model.config.img_size), dtype=torch.uint8)
    seen = []

    def fixed(batch, camids):
        assert len(batch) == 4  # the compiled model only takes its batch size
        seen.append(len(batch))
        with torch.no_grad():
            return model(batch)

    padded = extract_fixed_batch_features(fixed, 4, images, [0] * 5, needs_camids=False)
    assert seen == [4, 4] and padded.shape[0] == 5
    assert torch.allclose(padded, extract_features(model, images, [0] * 5), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(padded[4], model(normalize(images[4:]))[0], atol=1e-5)
