"""Attention pictures: records saved by the suite, drawn by `amg report` without model or data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from amg.benchmark.attention_record import RECORD_FILE, find_records, load_record, save_record
from amg.benchmark.recording import make_record
from amg.benchmark.results import ReportError, write_csv
from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan
from amg.model.vit import ReIDViT
from amg.reporting.pictures import draw_records
from amg.reporting.report import build_report

CONFIG = ModelConfig(name="tiny", img_size=(32, 16), patch_size=8, embed_dim=32, depth=3, num_heads=4)
PNG = b"\x89PNG\r\n\x1a\n"


def _plan(heads=None, tokens=None) -> PrunePlan:
    plan = PrunePlan.unpruned(CONFIG)
    if heads:
        plan.kept_heads = heads
    if tokens:
        plan.kept_tokens = tokens
    plan.policy = {"heads": "amg" if heads else "none", "tokens": "amg" if tokens else "none"}
    return plan


@pytest.fixture()
def record():
    torch.manual_seed(0)
    model = ReIDViT(CONFIG).eval()
    images = torch.randint(0, 255, (6, 3, 32, 16), dtype=torch.uint8)
    plans = {"heads0.25:amg": _plan(heads=[[0, 1, 2], [0, 1, 2], [1, 2, 3]]),
             "tokens0.5:amg": _plan(tokens=[[0, 1, 2, 3, 4], [0, 2, 4, 6, 8], [0, 1, 8]])}
    return make_record(model, "default", images, plans)


def test_record_holds_entropy_per_block_and_head_within_the_bound(record):
    assert len(record.entropy) == CONFIG.depth and all(len(row) == CONFIG.num_heads for row in record.entropy)
    max_bits = torch.log2(torch.tensor(float(CONFIG.num_tokens))).item()
    assert all(0 < value <= max_bits + 1e-5 for row in record.entropy for value in row)
    assert record.grid == (4, 2) and record.stride == 8 and record.key == "tiny-default"


def test_saving_merges_plans_and_round_trips(record, tmp_path):
    sample = torch.randint(0, 255, (32, 16, 3), dtype=torch.uint8).numpy()
    save_record(record, sample, tmp_path)
    later = copy.deepcopy(record)
    later.plans = {"heads0.5:amg": _plan(heads=[[0], [1], [2, 3]]).to_dict()}
    path = save_record(later, sample, tmp_path)
    loaded = load_record(path.parent)
    assert set(loaded.plans) == {"heads0.25:amg", "tokens0.5:amg", "heads0.5:amg"}
    assert loaded.entropy == record.entropy  # JSON keeps floats exactly
    assert find_records(tmp_path) == [path.parent]


def test_pictures_are_drawn_and_a_broken_record_is_named(record, tmp_path):
    save_record(record, np.zeros((32, 16, 3), dtype=np.uint8), tmp_path)
    [(drawn, paths)] = draw_records(tmp_path, tmp_path / "out")
    assert [p.name for p in paths] == ["head_entropy_tiny-default.png", "kept_kv_tiny-default.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    (tmp_path / "models" / "tiny-default" / RECORD_FILE).write_text("{not json")
    with pytest.raises(ReportError, match="attention.json is not an attention record"):
        draw_records(tmp_path, tmp_path / "out")


def test_report_shows_the_pictures(record, tmp_path):
    save_record(record, np.zeros((32, 16, 3), dtype=np.uint8), tmp_path)
    write_csv([{"run_id": "r", "timestamp": "2026-11-25T00:00:00Z", "device_id": "d", "backend": "cpu",
                "precision": "fp32", "batch": 1, "model": "tiny", "checkpoint": "default", "config_id": "unpruned",
                "head_ratio": 0, "token_ratio": 0, "macs": 10, "gmacs": 1e-8, "latency_median_ms": 1.0}],
              tmp_path, "d", "r")
    paths = build_report(tmp_path, tmp_path / "report")
    text = paths[0].read_text()
    assert "## What AMG removes" in text and "![head_entropy_tiny-default](head_entropy_tiny-default.png)" in text
    assert (tmp_path / "report" / "kept_kv_tiny-default.png").is_file()
