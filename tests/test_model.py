"""ReIDViT: presets, token counts, the explicit forward against timm's, the neck, saving and loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from amg.model.config import PRESETS, ModelConfig, get_config
from amg.model.vit import ReIDViT, build_model, load_model, save_model, set_neck_feat


def tiny(num_classes: int = 5, **overrides) -> ReIDViT:
    config = dataclasses.replace(
        ModelConfig("tiny-test", img_size=(64, 32), patch_size=16, embed_dim=48, depth=2, num_heads=3),
        **overrides,
    )
    torch.manual_seed(0)
    return ReIDViT(config, num_classes=num_classes)


@pytest.mark.parametrize("preset, tokens", [("small", 33), ("vit_tiny", 129), ("vit_small", 129),
                                             ("vit_base", 129), ("transreid_base", 211)])
def test_preset_token_counts(preset, tokens):
    config = get_config(preset)
    assert config.num_tokens == tokens
    model = build_model(preset)
    assert model.backbone.patch_embed.num_patches + 1 == tokens
    assert model.backbone.pos_embed.shape[1] == tokens


def test_preset_widths_match_timm_shapes():
    assert {name: (c.embed_dim, c.depth, c.num_heads) for name, c in PRESETS.items()
            if name.startswith("vit_")} == {
        "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'vit_huge'"):
        build_model("vit_huge")


def test_eval_feature_is_neck_of_class_token_after_norm():
    model = tiny().eval()
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        expected = model.neck(model.backbone.forward_features(images)[:, 0])
        assert torch.allclose(model(images), expected, atol=1e-6)


def test_training_forward_returns_logits_and_pre_neck_features():
    model = tiny().train()
    logits, features = model(torch.randn(4, 3, 64, 32))
    assert logits.shape == (4, 5) and features.shape == (4, 48)
    assert not model.neck.bias.requires_grad  # BNNeck keeps its bias at zero


def test_overlapping_patches_grid():
    model = tiny(patch_stride=12)
    # (64 - 16) // 12 + 1 = 5 rows, (32 - 16) // 12 + 1 = 2 cols
    assert model.backbone.patch_embed.grid_size == (5, 2)
    assert model.config.num_tokens == 11
    model.eval()
    assert model(torch.randn(2, 3, 64, 32)).shape == (2, 48)


def test_camera_embedding_changes_features_and_is_required():
    model = tiny(num_cameras=3).eval()
    images = torch.randn(1, 3, 64, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        features = model(images, torch.tensor([0, 2]))
    assert not torch.allclose(features[0], features[1])
    with pytest.raises(ValueError, match="camera embedding"):
        model(images)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(num_cameras=2).eval()
    path = save_model(model, tmp_path / "m.pt", note="x")
    loaded = load_model(path).eval()
    images, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(model(images, cams), loaded(images, cams))
    assert loaded.config == model.config
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_weights_stored_as_fp16_load_back_as_float32_at_half_the_size(tmp_path):
    torch.manual_seed(0)
    model = build_model("small", num_classes=5).eval()
    full = save_model(model, tmp_path / "full.pt")
    half = save_model(model, tmp_path / "half.pt", weights_dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_model(half)
    for name, tensor in loaded.state_dict().items():
        original = model.state_dict()[name]
        assert tensor.dtype == original.dtype, name
        assert torch.equal(tensor, original.half().to(original.dtype)), name  # exactly the fp16 rounding
    assert torch.load(half, weights_only=True)["meta"]["weights_dtype"] == "float16"
    images = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), rtol=1e-2, atol=1e-2)


def test_load_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "absent.pt")
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an AMG-Bench checkpoint"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(tmp_path / "corrupt.pt")


def test_load_names_mismatched_keys(tmp_path):
    model = tiny()
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    del payload["state_dict"]["neck.weight"]
    payload["config"]["embed_dim"] = 48
    torch.save(payload, path)
    with pytest.raises(ValueError) as error:
        load_model(path)
    assert "extra.weight" in str(error.value) and "neck.weight" in str(error.value)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({"name": "x", "bogus": 1})


def test_the_feature_before_the_neck_is_the_class_token_and_travels_with_the_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("small").eval()
    model.neck.running_mean.normal_()  # a trained neck: before and after differ
    images = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        after = model(images)
        set_neck_feat(model, "before")
        before = model(images)
        assert torch.equal(before, model.forward_tokens(images)[:, 0]) and not torch.allclose(before, after)
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    assert loaded.neck_feat == "before"
    with pytest.raises(ValueError, match="unknown neck feature 'middle'"):
        set_neck_feat(model, "middle")
