"""Importing foreign state dicts, generated here in each format's real key layout."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from amg.model.checkpoints import detect_format, import_state_dict
from amg.model.config import ModelConfig
from amg.model.vit import ReIDViT, build_model

CONFIG = ModelConfig("ckpt-test", img_size=(64, 32), patch_size=16, patch_stride=12,
                     embed_dim=48, depth=2, num_heads=3, num_cameras=3)


def fresh(seed: int, **overrides) -> ReIDViT:
    torch.manual_seed(seed)
    return ReIDViT(dataclasses.replace(CONFIG, **overrides), num_classes=4).eval()


def as_transreid(model: ReIDViT, jpm: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights under TransReID's names, as its DataParallel training saves them."""
    out = {}
    for key, value in model.state_dict().items():
        key = ("base." + key[len("backbone."):] if key.startswith("backbone.")
               else "base.sie_embed" if key == "sie_embed"
               else "bottleneck." + key[len("neck."):] if key.startswith("neck.")
               else key)
        out["module." + key] = value.clone()
    if jpm:  # JPM's local branches and their necks/classifiers, unused by ReIDViT
        out["module.b1.0.norm1.weight"] = torch.ones(48)
        out["module.b2.1.weight"] = torch.ones(48)
        out["module.bottleneck_1.weight"] = torch.ones(48)
        out["module.classifier_3.weight"] = torch.zeros(4, 48)
    return out


def test_transreid_round_trip_gives_identical_features(tmp_path):
    source = fresh(seed=1)
    path = tmp_path / "transformer_120.pth"
    torch.save({"state_dict": as_transreid(source)}, path)
    target = fresh(seed=2)
    report = import_state_dict(target, path)
    assert report.format == "transreid"
    assert "b1.0.norm1.weight" in report.dropped and "bottleneck_1.weight" in report.dropped
    images, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(source(images, cams), target(images, cams))


def test_timm_imagenet_layout_resizes_position_embedding():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    state = vit.state_dict()
    model = build_model("vit_tiny")  # 256x128 -> 16x8 grid
    report = import_state_dict(model, state)
    assert report.format == "timm"
    assert report.resized == ["backbone.pos_embed (14, 14) -> (16, 8)"]
    assert "head.weight" in report.dropped
    assert {"neck.weight", "neck.bias"} <= set(report.fresh)
    assert torch.equal(model.backbone.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert torch.equal(model.backbone.pos_embed[:, 0], state["pos_embed"][:, 0])  # class token kept


def test_la_transformer_layout_drops_part_classifiers():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    state = {"model." + k: v for k, v in vit.state_dict().items()}
    state["classifier0.add_block.0.weight"] = torch.zeros(3)
    state["classifier13.classifier.0.weight"] = torch.zeros(3)
    model = build_model("vit_tiny")
    report = import_state_dict(model, state)
    assert report.format == "la_transformer" and len(report.dropped) == 2


def test_unknown_keys_are_listed():
    state = as_transreid(fresh(seed=1), jpm=False)
    state["module.weird.thing"] = torch.zeros(1)
    with pytest.raises(ValueError, match="weird.thing"):
        import_state_dict(fresh(seed=2), state)


def test_unknown_key_inside_a_known_prefix_is_listed():
    state = as_transreid(fresh(seed=1), jpm=False)
    state["module.base.blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="backbone.blocks.9.attn.qkv.weight"):
        import_state_dict(fresh(seed=2), state)


def test_missing_and_misshaped_weights_are_named():
    state = as_transreid(fresh(seed=1), jpm=False)
    del state["module.base.blocks.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="missing keys.*backbone.blocks.1.mlp.fc1.weight"):
        import_state_dict(fresh(seed=2), state)
    wider = as_transreid(fresh(seed=1, embed_dim=60), jpm=False)
    with pytest.raises(ValueError, match="shape mismatches"):
        import_state_dict(fresh(seed=2), wider)


def test_non_square_grid_needs_source_grid():
    source = fresh(seed=1)  # 5x2 grid
    state = as_transreid(source, jpm=False)
    target = fresh(seed=2, img_size=(80, 40))  # 6x3 grid
    with pytest.raises(ValueError, match="source_grid"):
        import_state_dict(target, state)
    report = import_state_dict(target, state, source_grid=(5, 2))
    assert report.resized == ["backbone.pos_embed (5, 2) -> (6, 3)"]


def test_undetectable_format_is_explained():
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        detect_format({"foo.weight": torch.zeros(1)})
