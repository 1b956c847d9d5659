"""Import foreign `.pth` state dicts (TransReID, plain timm ViT, LA-Transformer / AMG reference).

Each format is a table of key-renaming rules. A rule maps a checkpoint key to a ReIDViT key,
or to None for a key the format is known to carry and ReIDViT has no use for (TransReID's JPM
branches, LA-Transformer's part classifiers). Every key must match a rule; what is left over
is reported by name, never silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from amg.errors import InputError
from amg.model.vit import ReIDViT, load_exact, read_checkpoint

Rule = tuple[str, str | None]  # (regex on the checkpoint key, replacement or None to drop)

FORMATS: dict[str, list[Rule]] = {
    # TransReID `build_transformer` / `build_transformer_local` (JPM) state dicts.
    "transreid": [
        (r"^base\.sie_embed$", "sie_embed"),
        (r"^base\.(fc|head)\.", None),  # ImageNet head, unused in Re-ID
        (r"^base\.(.*)$", r"backbone.\1"),
        (r"^bottleneck\.(.*)$", r"neck.\1"),
        (r"^classifier\.(.*)$", r"classifier.\1"),
        (r"^(b1|b2)\.", None),  # JPM branches: a copy of the last block + norm, for local features
        (r"^(bottleneck|classifier)_\d+\.", None),  # JPM local necks and classifiers
    ],
    # A timm VisionTransformer state dict (e.g. ImageNet weights saved locally).
    "timm": [
        (r"^(head|fc_norm|head_drop)\.", None),
        (r"^(.*)$", r"backbone.\1"),
    ],
    # LA-Transformer (the AMG reference code's base): timm ViT as `model`, part classifiers.
    "la_transformer": [
        (r"^model\.(head|fc_norm)\.", None),
        (r"^model\.(.*)$", r"backbone.\1"),
        (r"^classifier\d+\.", None),
    ],
}
# Formats without a Re-ID neck leave it (and the training classifier) at their fresh init.
FRESH_OK = {"timm": ("neck.", "classifier."), "la_transformer": ("neck.", "classifier."),
            "transreid": ("classifier.",)}


@dataclass
class ImportReport:
    format: str
    loaded: list[str]
    dropped: list[str]  # keys the format carries that ReIDViT does not use
    fresh: list[str]  # model keys left at initialisation
    resized: list[str]  # position embeddings resampled to the model's grid

    def summary(self) -> str:
        return (f"imported {len(self.loaded)} tensors ({self.format}); dropped {len(self.dropped)} unused; "
                f"{len(self.fresh)} left fresh; resized: {', '.join(self.resized) or 'none'}")


def detect_format(state_dict: dict[str, Any]) -> str:
    keys = set(state_dict)
    if any(k.startswith("base.") for k in keys):
        return "transreid"
    if any(k.startswith("model.blocks.") for k in keys):
        return "la_transformer"
    if any(k.startswith("blocks.") for k in keys) and "pos_embed" in keys:
        return "timm"
    raise InputError(
        "cannot tell the checkpoint format from its keys (first keys: "
        f"{', '.join(sorted(keys)[:5])}); pass format= one of {sorted(FORMATS)}"
    )


def _unwrap(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside common wrappers, without DataParallel's `module.` prefix."""
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if wrapper in payload and isinstance(payload[wrapper], dict):
            payload = payload[wrapper]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in payload.items()
            if isinstance(v, torch.Tensor)}


def rename_keys(state_dict: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply `fmt`'s rules; returns (renamed tensors, dropped keys). Unmatched keys raise."""
    if fmt not in FORMATS:
        raise InputError(f"unknown checkpoint format {fmt!r}; choose one of {sorted(FORMATS)}")
    renamed, dropped, unmatched = {}, [], []
    for key, value in state_dict.items():
        for pattern, replacement in FORMATS[fmt]:
            if re.match(pattern, key):
                if replacement is None:
                    dropped.append(key)
                else:
                    renamed[re.sub(pattern, replacement, key)] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise InputError(f"unknown keys for format {fmt!r} ({len(unmatched)}): {', '.join(unmatched[:20])}")
    return renamed, dropped


def _source_grid(num_patches: int, target: tuple[int, int], source_grid: tuple[int, int] | None) -> tuple[int, int]:
    """The checkpoint's patch grid: given, the model's own, or square (ImageNet ViTs)."""
    if source_grid is not None:
        if source_grid[0] * source_grid[1] != num_patches:
            raise InputError(f"source grid {source_grid} does not hold {num_patches} patches")
        return source_grid
    if num_patches == target[0] * target[1]:
        return target
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise InputError(
        f"position embedding has {num_patches} patches, which is neither the model's grid {target} nor "
        "square; pass source_grid=(rows, cols)"
    )


def import_state_dict(model: ReIDViT, source: str | Path | dict[str, Any], fmt: str = "auto",
                      source_grid: tuple[int, int] | None = None) -> ImportReport:
    """Load a foreign checkpoint into `model` in place, resizing the position embedding if needed."""
    name = str(source) if not isinstance(source, dict) else "<state dict>"
    payload = read_checkpoint(source) if not isinstance(source, dict) else source
    state_dict = _unwrap(payload)
    fmt = detect_format(state_dict) if fmt == "auto" else fmt
    renamed, dropped = rename_keys(state_dict, fmt)
    expected = model.state_dict()
    resized = []
    pos_key = "backbone.pos_embed"
    if pos_key in renamed and renamed[pos_key].shape != expected[pos_key].shape:
        grid = tuple(model.backbone.patch_embed.grid_size)
        old = _source_grid(renamed[pos_key].shape[1] - 1, grid, source_grid)
        renamed[pos_key] = resample_abs_pos_embed(renamed[pos_key], new_size=list(grid), old_size=list(old),
                                                  num_prefix_tokens=1)
        resized.append(f"{pos_key} {old} -> {grid}")
    # A classifier for another number of training identities is useless here: keep the fresh one.
    if "classifier.weight" in renamed and (
            "classifier.weight" not in expected or renamed["classifier.weight"].shape != expected["classifier.weight"].shape):
        dropped.append("classifier.weight")
        del renamed["classifier.weight"]
    fresh = [k for k in expected if k not in renamed and k.startswith(FRESH_OK.get(fmt, ()))]
    merged = {**{k: expected[k] for k in fresh}, **renamed}
    load_exact(model, merged, source=f"{name} (as {fmt})")
    return ImportReport(fmt, sorted(renamed), sorted(dropped), sorted(fresh), resized)
