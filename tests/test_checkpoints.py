"""Importing foreign state dicts, generated here in each format's real key layout."""

from __future__ import annotations

import dataclasses
import io
import pickle

import numpy as np
import pytest
import timm
import torch

from amg.cli import main
from amg.errors import InputError
from amg.model.checkpoints import detect_format, import_state_dict
from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan
from amg.model.vit import ReIDViT, build_model, load_model, save_model

CONFIG = ModelConfig("ckpt-test", img_size=(64, 32), patch_size=16, patch_stride=12,
                     embed_dim=48, depth=2, num_heads=3, num_cameras=3)


def fresh(seed: int, **overrides) -> ReIDViT:
    torch.manual_seed(seed)
    return ReIDViT(dataclasses.replace(CONFIG, **overrides), num_classes=4).eval()


def _transreid_name(key: str) -> str:
    return ("base." + key[len("backbone."):] if key.startswith("backbone.")
            else "base.sie_embed" if key == "sie_embed"
            else "bottleneck." + key[len("neck."):] if key.startswith("neck.")
            else key)


def as_transreid(model: ReIDViT, jpm: ReIDViT | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under TransReID's names, as its DataParallel training saves them.

    With `jpm` (another model), the layout of `build_transformer_local`: `model`'s last block and
    norm become `b1` (the global branch), the base keeps `jpm`'s last block and norm (which a
    JPM forward never runs), `b2` and the four local necks and classifiers are added."""
    state = {_transreid_name(k): v.clone() for k, v in model.state_dict().items()}
    if jpm is not None:
        last = f"backbone.blocks.{model.config.depth - 1}."
        other = jpm.state_dict()
        for key, value in model.state_dict().items():
            if key.startswith(last):
                state["b1.0." + key[len(last):]] = value.clone()
                state["b2.0." + key[len(last):]] = other[key].clone()
                state[_transreid_name(key)] = other[key].clone()
            elif key.startswith("backbone.norm."):
                state["b1.1." + key[len("backbone.norm."):]] = value.clone()
                state["b2.1." + key[len("backbone.norm."):]] = other[key].clone()
                state[_transreid_name(key)] = other[key].clone()
        for part in range(1, 5):
            for name, value in model.neck.state_dict().items():
                state[f"bottleneck_{part}.{name}"] = value.clone()
            state[f"classifier_{part}.weight"] = torch.zeros(4, model.config.embed_dim)
    return {"module." + k: v for k, v in state.items()}


def _images(config=CONFIG, batch: int = 2):
    torch.manual_seed(7)
    return torch.randn(batch, 3, *config.img_size), torch.arange(batch) % max(config.num_cameras, 1)


def test_transreid_round_trip_gives_identical_features(tmp_path):
    source = fresh(seed=1)
    path = tmp_path / "transformer_120.pth"
    torch.save({"state_dict": as_transreid(source)}, path)
    target = fresh(seed=2)
    report = import_state_dict(target, path)
    assert report.format == "transreid" and report.neck_feat == "before" == target.neck_feat
    images, cams = _images()
    with torch.no_grad():
        assert torch.equal(source.forward_tokens(images, cams)[:, 0], target(images, cams))
        source.neck_feat = target.neck_feat = "after"
        assert torch.equal(source(images, cams), target(images, cams))


def test_transreid_jpm_takes_the_global_feature_from_b1():
    source, base_leftovers = fresh(seed=1), fresh(seed=3)  # b1 differs from the base's last block
    target = fresh(seed=2)
    report = import_state_dict(target, as_transreid(source, jpm=base_leftovers))
    assert any(note.startswith("JPM: b1 is the last block") for note in report.notes)
    assert f"base.blocks.{CONFIG.depth - 1}.attn.qkv.weight" in report.dropped and "base.norm.weight" in report.dropped
    assert {"b2.0.attn.qkv.weight", "bottleneck_4.weight", "classifier_1.weight"} <= set(report.dropped)
    images, cams = _images()
    with torch.no_grad():
        expected = source.forward_tokens(images, cams)[:, 0]  # blocks[:-1], then b1's block and norm
        assert torch.allclose(target(images, cams), expected, atol=1e-4)
    last = CONFIG.depth - 1  # the base's own last block, which a JPM forward never runs, was not loaded
    assert torch.equal(target.backbone.blocks[last].attn.qkv.weight, source.backbone.blocks[last].attn.qkv.weight)
    assert not torch.equal(target.backbone.blocks[last].attn.qkv.weight,
                           base_leftovers.backbone.blocks[last].attn.qkv.weight)


def test_a_jpm_branch_with_more_than_a_block_and_a_norm_is_refused():
    state = as_transreid(fresh(seed=1), jpm=fresh(seed=3))
    state["module.b1.2.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match="b1 holds a block"):
        import_state_dict(fresh(seed=2), state)


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


LA_CONFIG = dataclasses.replace(CONFIG, num_cameras=0, depth=3)


def as_la_transformer(model: ReIDViT, masks: dict[int, list[int]] | None = None) -> dict:
    """What LA-Transformer (the AMG reference code's base) saves: the timm backbone as `model.*`
    (plus its unused ImageNet head), `cls_token` / `pos_embed` aliased at the top level, a
    `token_index` mask in every attention block (False: a K/V position the reference pruned),
    part classifiers `classifierN.*`, wrapped as `save_network` does: {'state_dict', 'channels',
    'heads'}, where 'channels' lists each block's kept K/V positions (`mask.sum() + 1`: torch
    scalars) once tokens were pruned and 'heads' each block's kept heads once heads were pruned
    (`prune()`'s `mask.sum()` of numpy masks: numpy.int64), None before."""
    backbone = {k[len("backbone."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state = {"model." + k: v for k, v in backbone.items()}
    state["model.head.weight"] = torch.zeros(10, model.config.embed_dim)
    state["cls_token"], state["pos_embed"] = backbone["cls_token"].clone(), backbone["pos_embed"].clone()
    for block in range(model.config.depth):
        mask = torch.ones(model.config.num_tokens, dtype=torch.bool)
        if masks and block in masks:
            mask[:] = False
            mask[masks[block]] = True
        state[f"model.blocks.{block}.attn.token_index"] = mask
    for part in range(3):
        state[f"classifier{part}.add_block.0.weight"] = torch.zeros(8, model.config.embed_dim)
        state[f"classifier{part}.classifier.0.weight"] = torch.zeros(4, 8)
    n = model.config.num_tokens
    channels = [torch.tensor(len(masks.get(block, range(n)))) for block in range(model.config.depth)] if masks else None
    heads = [np.int64(block.attn.num_heads) for block in model.backbone.blocks]
    pruned_heads = any(count < model.config.num_heads for count in heads)
    return {"state_dict": state, "channels": channels, "heads": heads if pruned_heads else None}


def key_masked_forward(model: ReIDViT, masks: dict[int, list[int]], images, emptied: set[int] = frozenset()
                       ) -> torch.Tensor:
    """The class token before the neck, with each block's dropped keys masked out of timm's own
    softmax: what the reference's token mask means, computed without amg's pruning code.
    `emptied` blocks have no head: their attention adds its projection's bias only (the
    reference's zero-row qkv gives zero-width heads, and proj of nothing is its bias)."""
    vit, n = model.backbone, model.config.num_tokens
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        for index, block in enumerate(vit.blocks):
            if index in emptied:
                x = x + block.attn.proj.bias
                x = x + block.mlp(block.norm2(x))
                continue
            mask = torch.ones(n, n, dtype=torch.bool)
            if index in masks:
                mask[:, [p for p in range(n) if p not in masks[index]]] = False
            x = block(x, attn_mask=mask)
        return vit.norm(x)[:, 0]


def test_la_transformer_layout_imports_with_its_aliases_and_unpruned_masks():
    source = fresh(seed=1, num_cameras=0, depth=3)
    target = fresh(seed=2, num_cameras=0, depth=3)
    report = import_state_dict(target, as_la_transformer(source))
    assert report.format == "la_transformer" and report.plan is None and report.neck_feat == "before"
    assert {"cls_token", "pos_embed", "model.head.weight", "classifier2.add_block.0.weight",
            "model.blocks.0.attn.token_index"} <= set(report.dropped)
    images, _ = _images(LA_CONFIG)
    with torch.no_grad():
        assert torch.equal(target(images), source.forward_tokens(images)[:, 0])


def test_a_pruned_reference_token_mask_becomes_a_plan():
    source, target = fresh(seed=1, num_cameras=0, depth=3), fresh(seed=2, num_cameras=0, depth=3)
    n = LA_CONFIG.num_tokens
    masks = {0: [0, 1, 3, 4, 7, 8], 2: [0] + list(range(2, n, 2))}
    report = import_state_dict(target, as_la_transformer(source, masks))
    assert report.plan.kept_tokens == [masks[0], None, masks[2]]
    assert report.plan.kept_heads == [list(range(LA_CONFIG.num_heads))] * 3
    assert target.plan is report.plan and report.plan.policy["tokens"] == "reference"
    images, _ = _images(LA_CONFIG)
    with torch.no_grad():
        assert torch.allclose(target(images), key_masked_forward(source, masks, images), atol=1e-5)


def test_heads_the_reference_removed_physically_are_kept_pruned():
    source = fresh(seed=1, num_cameras=0, depth=3)
    plan = PrunePlan.unpruned(source.config)
    plan.kept_heads = [[0, 2], [1], []]  # the reference may empty a block: zero-row qkv, bias-only proj
    apply_plan(source, plan)
    target = fresh(seed=2, num_cameras=0, depth=3)
    report = import_state_dict(target, as_la_transformer(source))
    assert report.plan.kept_heads == [[0, 1], [0], []]  # counts survive slicing, numbers do not
    images, _ = _images(LA_CONFIG)
    with torch.no_grad():
        assert torch.allclose(target(images), source.forward_tokens(images)[:, 0], atol=1e-5)


def _head_pruned_source() -> ReIDViT:
    source = fresh(seed=1, num_cameras=0, depth=3)
    plan = PrunePlan.unpruned(source.config)
    plan.kept_heads = [[0, 2], [1], [0, 1, 2]]
    return apply_plan(source, plan)


def _saved_as_numpy_1(state: dict, path) -> None:
    """`torch.save` as under numpy 1, whose scalars pickle as numpy.core.multiarray.scalar (numpy 2's
    as numpy._core...): the legacy (non-zip) format is one plain pickle, so the name can be rewritten."""
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))


@pytest.mark.parametrize("numpy_major", [2, 1])
def test_a_head_pruned_reference_file_with_numpy_head_counts_is_read(tmp_path, numpy_major):
    source = _head_pruned_source()
    state = as_la_transformer(source)
    assert [type(count) for count in state["heads"]] == [np.int64] * 3  # as the reference's prune() counts them
    path = tmp_path / "net_best.pth"
    if numpy_major == 2:
        torch.save(state, path)
    else:
        _saved_as_numpy_1(state, path)
    with pytest.raises(pickle.UnpicklingError, match=f"numpy{'._' if numpy_major == 2 else '.'}core.multiarray.scalar"):
        torch.load(path, weights_only=True)  # what weights-only loading says without the numpy globals
    target = fresh(seed=2, num_cameras=0, depth=3)
    report = import_state_dict(target, path)
    assert report.plan.kept_heads == [[0, 1], [0], [0, 1, 2]] and not report.warnings
    images, _ = _images(LA_CONFIG)
    with torch.no_grad():
        assert torch.allclose(target(images), source.forward_tokens(images)[:, 0], atol=1e-5)


def test_numpy_arrays_and_other_globals_stay_refused(tmp_path):
    """Only numpy numbers are allowed: an array (rebuilt by numpy's _reconstruct) is not."""
    state = as_la_transformer(_head_pruned_source())
    state["heads"] = np.array(state["heads"])
    path = tmp_path / "net_best.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"cannot read checkpoint .*: it holds a numpy\._?core\.multiarray\._reconstruct, "
                                         "which weights-only loading refuses"):
        import_state_dict(fresh(seed=2, num_cameras=0, depth=3), path)


@pytest.mark.parametrize("entry, value, message", [
    ("heads", [np.int64(2), np.int64(1), np.int64(2)], r"'heads' says \[2, 1, 2\] per block, but .* \[2, 1, 3\]"),
    ("heads", [np.int64(2), np.int64(1)], "'heads' lists 2 blocks, the model has 3"),
    ("channels", 3, "'channels' should list a whole number per block"),
])
def test_saved_counts_that_disagree_with_the_weights_are_named(entry, value, message):
    state = as_la_transformer(_head_pruned_source())
    state[entry] = value
    with pytest.raises(InputError, match=message):
        import_state_dict(fresh(seed=2, num_cameras=0, depth=3), state)


def _empty_block(state: dict, block: int, config: ModelConfig = LA_CONFIG) -> None:
    """What the reference's prune_attention leaves of a block it takes every head from: a zero-row
    qkv, a zero-column proj that keeps its bias, the block's token mask, and 'heads' counting 0."""
    weights = state["state_dict"]
    prefix = f"model.blocks.{block}.attn."
    weights[prefix + "qkv.weight"] = weights[prefix + "qkv.weight"][:0].clone()
    weights[prefix + "qkv.bias"] = weights[prefix + "qkv.bias"][:0].clone()
    weights[prefix + "proj.weight"] = weights[prefix + "proj.weight"][:, :0].clone()
    heads = [np.int64(config.num_heads)] * config.depth
    heads[block] = np.int64(0)
    state["heads"] = heads


def test_a_block_emptied_after_its_tokens_were_pruned_ignores_its_token_mask():
    """The reference prunes tokens first, then heads: a block can lose every head and keep a
    pruned token mask, which its forward applies to keys no head reads."""
    source = fresh(seed=1, num_cameras=0, depth=3)
    n = LA_CONFIG.num_tokens
    masks = {0: [0, 1, 3, 4, 7, 8], 1: [0] + list(range(2, n, 2))}
    state = as_la_transformer(source, masks)
    _empty_block(state, 1)
    target = fresh(seed=2, num_cameras=0, depth=3)
    report = import_state_dict(target, state)
    assert report.plan.kept_heads[1] == [] and report.plan.kept_tokens == [masks[0], None, None]
    assert report.warnings == [f"block 1 keeps no head, so its token mask ({len(masks[1])} of {n} key/value "
                               "positions) is ignored: the block's attention adds only its projection's bias, "
                               "as in the reference"]
    images, _ = _images(LA_CONFIG)
    with torch.no_grad():
        expected = key_masked_forward(source, {0: masks[0]}, images, emptied={1})
        assert torch.allclose(target(images), expected, atol=1e-5)


def test_the_import_command_prints_the_ignored_mask_as_a_warning(tmp_path, capsys):
    source = build_model("small", img_size=(64, 32))  # a preset: the command builds the model by name
    state = as_la_transformer(source, {1: [0, 1, 2]})
    _empty_block(state, 1, source.config)
    path = tmp_path / "net_best.pth"
    torch.save(state, path)
    out = tmp_path / "imported.pt"
    assert main(["import", str(path), "--preset", "small", "--img-size", "64", "32", "--out", str(out)]) == 0
    assert "[amg] warning: block 1 keeps no head, so its token mask (3 of" in capsys.readouterr().err


@pytest.mark.parametrize("neck_feat, stored", [(None, "before"), ("after", "after"), ("before", "before")])
def test_the_import_summary_names_the_feature_the_file_stores(tmp_path, capsys, neck_feat, stored):
    path = tmp_path / "net_best.pth"
    torch.save(as_la_transformer(build_model("small", img_size=(64, 32))), path)
    out = tmp_path / "imported.pt"
    option = ["--neck-feat", neck_feat] if neck_feat else []
    assert main(["import", str(path), "--preset", "small", "--img-size", "64", "32", "--out", str(out), *option]) == 0
    assert f"retrieval feature: the class token {stored} the BN neck" in capsys.readouterr().err
    assert load_model(out).neck_feat == stored


def test_an_amg_model_file_needs_no_import(tmp_path, capsys):
    path = save_model(fresh(seed=1), tmp_path / "model.pt")
    with pytest.raises(InputError, match="model.pt is already an amg model file .*no import needed"):
        import_state_dict(fresh(seed=2), path)
    assert main(["import", str(path), "--preset", "small", "--out", str(tmp_path / "again.pt")]) == 2
    error = capsys.readouterr().err
    assert "is already an amg model file" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("key, value, message", [
    ("module.base.pos_embed", torch.zeros(48), r"'base.pos_embed' \(the model's backbone.pos_embed\) has shape \(48,\); "
                                               r"expected \(1, 1 \+ patches, width\), here \(1, 11, 48\)"),
    ("module.base.pos_embed", torch.zeros(0), r"'base.pos_embed' .* has shape \(0,\)"),
    ("module.base.pos_embed", torch.zeros(1, 0, 48), r"'base.pos_embed' .* has shape \(1, 0, 48\)"),
])
def test_a_position_embedding_of_the_wrong_rank_or_empty_is_named(key, value, message):
    state = as_transreid(fresh(seed=1))
    state[key] = value
    with pytest.raises(InputError, match=message):
        import_state_dict(fresh(seed=2), state)


@pytest.mark.parametrize("key, value, message", [
    ("model.blocks.0.attn.token_index", torch.zeros(0, dtype=torch.bool),
     r"model.blocks.0.attn.token_index: an empty token mask \(shape \(0,\)\)"),
    ("model.blocks.0.attn.qkv.weight", torch.zeros(0), r"model.blocks.0.attn.qkv.weight: shape \(0,\)"),
    ("model.blocks.0.attn.qkv.weight", torch.zeros(144), r"model.blocks.0.attn.qkv.weight: shape \(144,\)"),
    ("model.pos_embed", torch.zeros(48), r"'model.pos_embed' \(the model's backbone.pos_embed\) has shape \(48,\)"),
])
def test_empty_or_flat_reference_tensors_are_named(key, value, message):
    state = as_la_transformer(fresh(seed=1, num_cameras=0, depth=3))
    state["state_dict"][key] = value
    if key == "model.pos_embed":
        state["state_dict"]["pos_embed"] = value  # the alias, saved alike
    with pytest.raises(InputError, match=message):
        import_state_dict(fresh(seed=2, num_cameras=0, depth=3), state)


@pytest.mark.parametrize("damage, message", [
    (lambda state: state["state_dict"].update(cls_token=torch.ones(1, 1, 48)), "should alias 'model.cls_token'"),
    (lambda state: state["state_dict"]["model.blocks.1.attn.token_index"].__setitem__(0, False),
     "drops the class token"),
])
def test_la_transformer_damage_is_named(damage, message):
    state = as_la_transformer(fresh(seed=1, num_cameras=0, depth=3), {1: [0, 1, 2]})
    damage(state)
    with pytest.raises(InputError, match=message):
        import_state_dict(fresh(seed=2, num_cameras=0, depth=3), state)


def test_unknown_keys_are_listed():
    state = as_transreid(fresh(seed=1))
    state["module.weird.thing"] = torch.zeros(1)
    with pytest.raises(ValueError, match="weird.thing"):
        import_state_dict(fresh(seed=2), state)


def test_unknown_key_inside_a_known_prefix_is_listed():
    state = as_transreid(fresh(seed=1))
    state["module.base.blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="backbone.blocks.9.attn.qkv.weight"):
        import_state_dict(fresh(seed=2), state)


def test_missing_and_misshaped_weights_are_named():
    state = as_transreid(fresh(seed=1))
    del state["module.base.blocks.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="missing keys.*backbone.blocks.1.mlp.fc1.weight"):
        import_state_dict(fresh(seed=2), state)
    wider = as_transreid(fresh(seed=1, embed_dim=60))
    with pytest.raises(ValueError, match="shape mismatches"):
        import_state_dict(fresh(seed=2), wider)


def test_non_square_grid_needs_source_grid():
    source = fresh(seed=1)  # 5x2 grid
    state = as_transreid(source)
    target = fresh(seed=2, img_size=(80, 40))  # 6x3 grid
    with pytest.raises(ValueError, match="source_grid"):
        import_state_dict(target, state)
    report = import_state_dict(target, state, source_grid=(5, 2))
    assert report.resized == ["backbone.pos_embed (5, 2) -> (6, 3)"]


def test_undetectable_format_is_explained():
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        detect_format({"foo.weight": torch.zeros(1)})
