"""Pruned vs unpruned CPU latency of a ViT at Re-ID size: speed-up measured in the same run.

Latency does not depend on *which* heads or positions go, only on how many per block, so
the plans here use the random policies (no calibration): what is measured is the cost
structure of physically pruned heads and static K/V indices on this device. Each pruned
configuration records its fvcore MACs saving, its latency saving against the unpruned
model timed in rounds interleaved with it in the same test (amg.measure.latency), and
their ratio (1.0: latency falls as MACs do).
"""

from __future__ import annotations

import copy

import pytest
import torch

from amg.measure.flops import count_macs
from amg.measure.latency import paired_speedup
from amg.model import build_model
from amg.prune import apply_plan, make_plan

PLANS = {  # name: (head ratio, token ratio)
    "unpruned": (0.0, 0.0),
    "heads25": (0.25, 0.0),
    "heads50": (0.5, 0.0),
    "tokens25": (0.0, 0.25),
    "tokens50": (0.0, 0.5),
    "heads25+tokens25": (0.25, 0.25),
}
BATCHES = (1, 32)
PAIRED_ROUNDS = {1: 30, 32: 8}


@pytest.fixture(scope="module")
def latency_base(request):
    torch.manual_seed(0)
    model = build_model(request.config.getoption("--amg-latency-model")).eval()
    return model, count_macs(model).total


def inference(model, images):
    def forward():
        with torch.inference_mode():
            return model(images)
    return forward


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("plan_name", PLANS)
def test_pruned_latency(benchmark, latency_base, amg_threads, plan_name, batch):
    base, base_macs = latency_base
    heads, tokens = PLANS[plan_name]
    plan = make_plan(base, heads=heads, tokens=tokens, head_policy="random", token_policy="random", seed=0)
    model = apply_plan(copy.deepcopy(base), plan)
    macs = count_macs(model).total
    images = torch.randn(batch, 3, *model.config.img_size)
    forward = inference(model, images)
    features = benchmark.pedantic(forward, rounds=20 if batch == 1 else 3, warmup_rounds=2, iterations=1)
    assert features.shape == (batch, model.feature_dim)
    macs_saving = 1 - macs / base_macs
    info = benchmark.extra_info
    info.update(backend="cpu", batch=batch, threads=amg_threads, preset=model.config.name, plan=plan_name,
                head_ratio=heads, token_ratio=tokens, gmacs_per_image=round(macs / 1e9, 4),
                macs_saving=round(macs_saving, 4))
    if plan_name == "unpruned" or benchmark.disabled:
        return
    # The speed-up comes from rounds interleaved with the unpruned model, in this very test.
    speedup, reference, pruned = paired_speedup(inference(base, images), forward, PAIRED_ROUNDS[batch])
    info.update(speedup=round(speedup, 3), latency_saving=round(1 - 1 / speedup, 4),
                latency_over_macs_saving=round((1 - 1 / speedup) / macs_saving, 3),
                paired_median_ms=round(pruned.median_ms, 3), paired_unpruned_median_ms=round(reference.median_ms, 3))
