"""LA-Transformer's own test feature ("la-parts") equals what its test code computes.

The re-implementation follows LATransformer/model.py `LATransformerTest.forward` and test.py
step by step, with the same torch calls: blocks and final norm, `AdaptiveAvgPool2d((14,
embed_dim))` over the patch tokens, each part divided by its L2 norm times sqrt(14), the
parts concatenated (no class token mixed in at test time).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_checkpoints import as_la_transformer

from amg.errors import InputError
from amg.model.checkpoints import import_state_dict
from amg.model.config import LA_PARTS_FEATURE, ModelConfig
from amg.model.la_parts import part_pooling
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan, load_pruned, save_pruned
from amg.model.vit import ReIDViT, set_neck_feat

# 112x112 at patch 8 is LA-Transformer's 14x14 grid (196 patches: one row per part); 64x48 has
# 48 patches, which 14 bins do not divide (overlapping bins, as AdaptiveAvgPool makes them).
SQUARE = ModelConfig("la-square", img_size=(112, 112), patch_size=8, embed_dim=48, depth=2, num_heads=3)
UNEVEN = dataclasses.replace(SQUARE, name="la-uneven", img_size=(64, 48))


def la_transformer_test_feature(model: ReIDViT, images: torch.Tensor) -> torch.Tensor:
    """`LATransformerTest.forward`, then test.py's per-part normalisation and concatenation."""
    vit = model.backbone
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        x = vit.norm(vit.blocks(x))
        x = torch.nn.AdaptiveAvgPool2d((14, vit.embed_dim))(x[:, 1:])  # LATransformerTest's avgpool
        vectors = []
        for query in x:  # test.py, per image: [14, D]
            fnorm = torch.norm(query, p=2, dim=1, keepdim=True) * np.sqrt(14)
            vectors.append(query.div(fnorm.expand_as(query)).view(-1))
        return torch.stack(vectors)


def imported(config: ModelConfig, masks=None) -> tuple[ReIDViT, ReIDViT]:
    """(a source model, a fresh model importing its LA-Transformer checkpoint with la-parts)."""
    torch.manual_seed(1)
    source = ReIDViT(config).eval()
    torch.manual_seed(2)
    target = ReIDViT(config).eval()
    report = import_state_dict(target, as_la_transformer(source, masks), neck_feat=LA_PARTS_FEATURE)
    assert report.neck_feat == LA_PARTS_FEATURE and "14 parts" in report.summary()
    return source, target


def _images(config: ModelConfig) -> torch.Tensor:
    return torch.randn(3, 3, *config.img_size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("config", [SQUARE, UNEVEN], ids=["14x14-grid", "uneven-bins"])
def test_la_parts_equal_la_transformers_test_feature(config):
    source, target = imported(config)
    images = _images(config)
    with torch.no_grad():
        features = target(images)
    assert features.shape == (3, 14 * config.embed_dim) == (3, target.feature_dim)
    assert torch.allclose(features, la_transformer_test_feature(source, images), atol=1e-6)
    assert torch.allclose(features.norm(dim=1), torch.ones(3))  # unit length: inner product = cosine


def test_la_parts_of_a_token_pruned_import_follow_its_masks():
    n = UNEVEN.num_tokens
    _, target = imported(UNEVEN, {1: [0] + list(range(1, n, 3))})
    assert target.plan.kept_tokens[1] is not None
    images = _images(UNEVEN)
    with torch.no_grad():
        tokens = target.forward_tokens(images)  # amg's K/V-pruned forward, checked in test_checkpoints
        pooled = torch.nn.AdaptiveAvgPool2d((14, UNEVEN.embed_dim))(tokens[:, 1:])
        expected = (pooled / (pooled.norm(dim=2, keepdim=True) * np.sqrt(14))).flatten(1)
        assert torch.allclose(target(images), expected, atol=1e-6)


def test_the_pooling_matrix_is_adaptive_pooling():
    tokens = torch.randn(2, 37, 5)
    pooled = torch.nn.AdaptiveAvgPool2d((14, 5))(tokens)
    assert torch.allclose(part_pooling(37) @ tokens, pooled, atol=1e-6)


def test_la_parts_read_the_whole_last_block_and_survive_saving(tmp_path):
    _, target = imported(UNEVEN)
    with pytest.raises(InputError, match="patch tokens"):
        target.use_class_token_last_block()
    plain = ReIDViT(UNEVEN).eval().use_class_token_last_block()
    set_neck_feat(plain, LA_PARTS_FEATURE)  # a class-token forward would be wrong: it is not used
    assert not plain.class_token_block_active
    path = save_pruned(target, tmp_path / "la.pt")
    loaded = load_pruned(path)
    assert loaded.neck_feat == LA_PARTS_FEATURE and loaded.feature_dim == 14 * UNEVEN.embed_dim
    images = _images(UNEVEN)
    with torch.no_grad():
        assert torch.equal(loaded(images), target(images))


def test_la_parts_refuse_dynamic_token_policies():
    model = ReIDViT(UNEVEN).eval()
    plan = PrunePlan.unpruned(UNEVEN)
    plan.dynamic_tokens = {"policy": "evit", "amount": 0.5}
    apply_plan(model, plan)
    set_neck_feat(model, LA_PARTS_FEATURE)
    with torch.no_grad(), pytest.raises(InputError, match="pool the 48 patch tokens by position"):
        model(_images(UNEVEN))


def test_la_parts_export_to_onnx_with_the_same_features(tmp_path):
    """The pooling is a fixed matrix: the TorchScript exporter takes it (adaptive pooling with
    uneven bins it would not)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from amg.measure.export import example_inputs, export_onnx, feeds, input_names, model_inputs

    _, target = imported(UNEVEN)
    images, cams = example_inputs(target, 2)
    path = export_onnx(target, model_inputs(images, cams), tmp_path / "la.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, feeds(input_names(target), model_inputs(images, cams)))[0]
    with torch.no_grad():
        assert np.abs(exported - target(images).numpy()).max() < 1e-5
