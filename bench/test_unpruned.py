"""The unpruned model on the CPU: latency at batch 1 and 32, and Re-ID accuracy."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("batch", [1, 32])
def test_cpu_latency_unpruned(benchmark, reid_model, amg_threads, batch):
    model, _ = reid_model
    images = torch.randn(batch, 3, *model.config.img_size)
    camids = torch.zeros(batch, dtype=torch.long) if model.sie_embed is not None else None

    def forward():
        with torch.inference_mode():
            return model(images, camids)

    benchmark.extra_info.update(
        backend="cpu", batch=batch, threads=amg_threads, preset=model.config.name,
        params=sum(p.numel() for p in model.parameters()), tokens=model.config.num_tokens,
    )
    features = benchmark.pedantic(forward, rounds=30 if batch == 1 else 10, warmup_rounds=3, iterations=1)
    assert features.shape == (batch, model.feature_dim)
    assert torch.isfinite(features).all()


def test_accuracy_unpruned(benchmark, reid_model, evaluator):
    model, _ = reid_model
    results = benchmark.pedantic(evaluator.evaluate, args=(model,), rounds=1, iterations=1)
    for name, metrics in results.items():
        for metric, value in metrics.as_dict().items():
            benchmark.extra_info[f"{name}_{metric}"] = round(value, 4)
        assert 0.0 <= metrics.mAP <= 1.0 and metrics.num_queries > 0
