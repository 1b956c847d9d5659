"""What only a GPU can check: the cuda backend, autocast precisions, inductor on CUDA, CUDA
memory stats and evaluation on the GPU. Skipped (with the reason) without CUDA; `scripts/gpu-check`
sets AMG_REQUIRE_CUDA=1, under which a missing GPU fails them instead."""

from __future__ import annotations

import os

import pytest
import torch

import amg.measure.backends as backends
from amg.measure.memory import measure_peak_memory
from amg.model.config import ModelConfig
from amg.model.pruned import apply_plan, save_pruned
from amg.model.vit import ReIDViT
from amg.pruning.planner import make_plan

pytestmark = pytest.mark.cuda
CONFIG = ModelConfig("cuda-test", img_size=(64, 32), embed_dim=48, depth=2, num_heads=3)


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        if os.environ.get("AMG_REQUIRE_CUDA") == "1":
            pytest.fail("AMG_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")


def _pruned() -> ReIDViT:
    torch.manual_seed(0)
    model = ReIDViT(CONFIG).eval()
    return apply_plan(model, make_plan(model, heads=0.34, tokens=0.4, head_policy="random", token_policy="random"))


@pytest.mark.parametrize("backend", ["cuda", "inductor"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_runners_agree_with_the_cpu_model(backend, precision):
    model = _pruned()
    runner = backends.prepare(backend, model, batch=4, precision=precision)
    assert runner.torch_device == "cuda" and runner.synchronize is not None
    # TF32 convolutions and reduced precision: close, not equal
    assert runner.output_cosine > (0.9999 if precision == "fp32" else 0.99), runner.note
    images = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        expected = model.cpu()(images)
    features = runner.features(images, None).float().cpu()
    assert torch.nn.functional.cosine_similarity(features, expected, dim=1).min() > 0.99


def test_cuda_memory_is_measured_in_an_isolated_process(tmp_path):
    path = save_pruned(_pruned(), tmp_path / "model.pt")
    small, large = measure_peak_memory(path, "cuda", batch=1), measure_peak_memory(path, "cuda", batch=256)
    assert small.cuda_max_allocated_mb is not None and large.cuda_max_allocated_mb > small.cuda_max_allocated_mb


def test_evaluation_on_the_gpu_ranks_as_on_the_cpu(tiny_trained):
    import copy

    from amg.train.evaluate import Evaluator

    dataset, model = tiny_trained
    evaluator = Evaluator(dataset, model.config.img_size)
    on_cpu = evaluator.evaluate(copy.deepcopy(model))
    on_gpu = evaluator.evaluate(copy.deepcopy(model).cuda())
    for name, metrics in on_cpu.items():
        assert on_gpu[name].as_dict()["mAP"] == pytest.approx(metrics.as_dict()["mAP"], abs=1e-3)


def test_torchrun_fine_tunes_on_the_gpu_with_nccl(tiny_trained, tmp_path):
    """One process per GPU (one here): NCCL, the model on its GPU while it trains, a loadable file after."""
    import subprocess
    import sys

    from amg.model.pruned import load_pruned
    from amg.model.vit import save_model

    dataset, model = tiny_trained
    out = tmp_path / "pruned.pt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             "-m", "amg.cli", "prune", "--model", str(save_model(model, tmp_path / "tiny.pt")),
                             "--data", str(dataset.root), "--heads", "0.34", "--finetune", "3",
                             "--calibration-images", "6", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "data parallel over 1 processes (nccl)" in result.stderr
    assert not torch.equal(load_pruned(out).classifier.weight, model.classifier.weight)
