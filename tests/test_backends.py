"""Backends: detection, device ids, runners that agree with PyTorch, isolated peak memory."""

from __future__ import annotations

import re

import pytest
import torch

import amg.measure.backends as backends
import amg.measure.device as device
from amg.errors import InputError
from amg.measure.backend_registry import BACKENDS, PRECISIONS
from amg.measure.memory import measure_peak_memory
from amg.model.config import ModelConfig
from amg.model.pruned import apply_plan, save_pruned
from amg.model.vit import ReIDViT
from amg.pruning.planner import make_plan

CONFIG = ModelConfig("backend-test", img_size=(64, 32), embed_dim=48, depth=2, num_heads=3)


def tiny(pruned: bool = True, emptied_block: int | None = None, mlp: float = 0.0) -> ReIDViT:
    """A small random model, pruned at random (and with every head of `emptied_block` removed,
    `mlp` of its MLP channels)."""
    torch.manual_seed(0)
    model = ReIDViT(CONFIG).eval()
    if pruned:
        plan = make_plan(model, heads=0.34, tokens=0.4, head_policy="random", token_policy="random", mlp=mlp,
                         mlp_policy="random")
        if emptied_block is not None:
            plan.kept_heads[emptied_block], plan.kept_tokens[emptied_block] = [], None
        apply_plan(model, plan)
    return model


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.availability("tpu")


def test_cpu_always_runs_and_unavailable_ones_say_why():
    assert backends.availability("cpu") is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in backends.availability("cuda")
        with pytest.raises(backends.BackendUnavailable, match="cuda: no CUDA device"):
            backends.prepare("cuda", tiny(), 1)


def test_board_detection_reads_the_device_tree(tmp_path, monkeypatch):
    model_file = tmp_path / "model"
    monkeypatch.setattr(device, "DEVICE_TREE_MODEL", model_file)
    monkeypatch.setattr(device, "TEGRA_RELEASE", tmp_path / "absent")
    model_file.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert device.is_raspberry_pi() and not device.is_jetson()
    assert backends.availability("rpi") is None
    assert device.device_id().startswith(f"{device.platform.machine().lower()}-raspberry-pi-5-model-b")
    model_file.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert device.is_jetson() and not device.is_raspberry_pi()
    assert "the device tree does not name a Raspberry Pi" == backends.availability("rpi")


def test_a_gpu_is_named_from_its_driver_without_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "DEVICE_TREE_MODEL", tmp_path / "absent")
    monkeypatch.setattr(device, "NVIDIA_GPUS", tmp_path / "gpus")
    assert device.gpu_name() == "" and " + " not in device.device_name()
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (tmp_path / "gpus" / "0000:01:00.0" / "information").write_text(
        "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 35\n")
    assert device.gpu_name() == "NVIDIA H100 80GB HBM3"
    assert device.device_name().startswith("NVIDIA H100 80GB HBM3 + ")
    assert "-nvidia-h100-80gb-hbm3-" in device.device_id()


def test_device_id_is_file_system_safe_and_overridable(monkeypatch):
    assert re.fullmatch(r"[a-z0-9_-]+", device.device_id())
    monkeypatch.setenv("AMG_DEVICE_ID", "Lab Box #3 (Orin/8GB)")
    assert device.device_id() == "lab-box-3-orin-8gb"


def test_every_backend_entry_names_functions_that_exist():
    for entry in BACKENDS.values():
        assert callable(getattr(backends, entry.availability)) and callable(getattr(backends, entry.runner)), entry
        assert set(entry.precisions) <= set(PRECISIONS) and "fp32" in entry.precisions


def test_a_precision_the_backend_does_not_run_is_a_skip_with_the_reason():
    with pytest.raises(backends.BackendUnavailable, match="onnxruntime runs fp32, int8 here, not bf16"):
        backends.prepare("onnxruntime", tiny(), 1, "bf16")
    with pytest.raises(backends.BackendUnavailable, match="cpu runs fp32, bf16 here, not fp16"):
        backends.prepare("cpu", tiny(), 1, "fp16")


@pytest.mark.parametrize("variant", ["pruned", "emptied-block", "class-token-last-block", "mlp-channels"])
@pytest.mark.parametrize("backend", ["cpu", "torchscript", "onnxruntime", "openvino"])
def test_runners_agree_with_pytorch(backend, variant):
    if backends.availability(backend):
        pytest.skip(backends.availability(backend))
    model = tiny(emptied_block=0 if variant == "emptied-block" else None, mlp=0.45 if variant == "mlp-channels" else 0)
    if variant == "class-token-last-block":
        model.use_class_token_last_block()
    runner = backends.prepare(backend, model, batch=2)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 32, generator=generator)  # the runner's fixed input
    with torch.no_grad():
        expected = model(images)
    output = runner()
    output = torch.as_tensor(output[0] if isinstance(output, list) else output)
    assert torch.allclose(output, expected, atol=1e-4)


def test_peak_memory_runs_isolated(tmp_path):
    path = save_pruned(tiny(), tmp_path / "tiny.pt")
    small, large = measure_peak_memory(path, batch=1), measure_peak_memory(path, batch=256)
    assert 0 < small.baseline_rss_mb <= small.peak_rss_mb
    assert large.peak_rss_mb > small.peak_rss_mb  # activations of 256 images show up
    assert small.cuda_max_allocated_mb is None
    with pytest.raises(InputError, match="memory measurement failed: model file not found"):
        measure_peak_memory(tmp_path / "absent.pt")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_dynamic_token_models_that_do_not_export_are_skipped_with_the_reason(backend):
    if backends.availability(backend):
        pytest.skip(backends.availability(backend))
    model = tiny(pruned=False)
    apply_plan(model, make_plan(model, tokens=0.3, token_policy="tome"))
    try:
        runner = backends.prepare(backend, model, batch=1)
    except backends.BackendUnavailable as reason:
        assert f"{backend}: the dynamic token policy 'tome'" in str(reason)
    else:  # should a future exporter handle it, the output must still match PyTorch
        images = torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(torch.as_tensor(runner()[0]), model(images), atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "torchscript", "onnxruntime", "openvino"])
def test_a_runner_computes_features_of_other_images_with_its_compiled_model(backend):
    """What accuracy of an exported model is measured with: any images of the compiled batch size."""
    if backends.availability(backend):
        pytest.skip(backends.availability(backend))
    model = tiny()
    runner = backends.prepare(backend, model, batch=3)
    images = torch.rand(3, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(images)
    assert runner.batch == 3 and runner.output_max_diff <= backends.OUTPUT_PARITY
    assert torch.allclose(runner.features(images, None), expected, atol=1e-4)


@pytest.mark.parametrize("backend, precision", [("onnxruntime", "int8"), ("openvino", "int8"), ("openvino", "bf16"),
                                                ("cpu", "bf16")])
def test_reduced_precision_runs_close_to_fp32_and_says_how_close(backend, precision):
    if backends.availability(backend):
        pytest.skip(backends.availability(backend))
    model = tiny()
    calibration = torch.randn(16, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    runner = backends.prepare(backend, model, batch=2, precision=precision, calibration=calibration)
    assert backends.MIN_COSINE <= runner.output_cosine <= 1.0 + 1e-6
    assert runner.output_max_diff > 0  # not the fp32 model under another name
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
    similarity = torch.nn.functional.cosine_similarity(runner.features(images, None), expected, dim=1)
    assert similarity.min() > 0.8
    if precision == "int8":
        assert "calibrated on 16 images" in runner.note


def test_a_reduced_precision_that_loses_the_features_is_not_timed(monkeypatch):
    if backends.availability("onnxruntime"):
        pytest.skip(backends.availability("onnxruntime"))
    monkeypatch.setattr(backends, "MIN_COSINE", 1.5)  # no output can reach it
    with pytest.raises(backends.BackendUnavailable, match=r"onnxruntime int8: its features no longer match"):
        backends.prepare("onnxruntime", tiny(), batch=1, precision="int8")


def test_int8_calibration_needs_a_whole_batch_of_images():
    if backends.availability("onnxruntime"):
        pytest.skip(backends.availability("onnxruntime"))
    with pytest.raises(InputError, match="INT8 calibration needs at least 4 images"):
        backends.prepare("onnxruntime", tiny(), batch=4, precision="int8", calibration=torch.randn(3, 3, 64, 32))


def test_tensorrt_without_its_provider_is_a_skip_naming_what_is_missing():
    reason = backends.availability("tensorrt")
    if reason is None:
        pytest.skip("this machine has ONNX Runtime's TensorRT provider")
    assert "TensorrtExecutionProvider" in reason or "onnxruntime" in reason
    with pytest.raises(backends.BackendUnavailable, match="tensorrt: "):
        backends.prepare("tensorrt", tiny(), 1)
