"""Import foreign `.pth` state dicts (TransReID, plain timm ViT, LA-Transformer / AMG reference).

Each format is a table of key-renaming rules. A rule maps a checkpoint key to a ReIDViT key,
or to None for a key the format is known to carry and ReIDViT has no use for (TransReID's JPM
local branch, LA-Transformer's part classifiers). Every key must match a rule; what is left
over is reported by name, never silently dropped. Two formats need more than renaming:

- TransReID with JPM (`build_transformer_local`): the backbone runs `blocks[:-1]`, and the
  global feature comes from `b1`, a separately trained copy of the last block and the final
  norm. `b1` becomes the last block and norm; the base's own last block and norm (never used
  by a JPM forward) are dropped.
- LA-Transformer (the AMG reference code): `cls_token` / `pos_embed` are saved twice (aliases
  of the backbone's), and each attention block carries `token_index`, the reference's key/value
  token mask. An all-True mask is dropped; a pruned one becomes a `PrunePlan` keeping those
  K/V positions, as do heads the reference removed physically (smaller qkv weights). A block
  emptied of heads after its tokens were pruned keeps its mask, which the reference's forward
  never uses there (no head reads keys): it is ignored, with a warning. Beside the weights the
  reference saves the kept heads and K/V positions per block ('heads' as numpy integers,
  'channels'), which are checked against the weights.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from amg.errors import InputError
from amg.model.checkpoint_formats import FORMATS, FRESH_OK, SOURCE_NECK_FEAT
from amg.model.config import ModelConfig, describe_feature
from amg.model.plan import PrunePlan
from amg.model.pruned import apply_plan
from amg.model.vit import CHECKPOINT_FORMAT, ReIDViT, load_exact, read_checkpoint, set_neck_feat


@dataclass
class ImportReport:
    format: str
    loaded: list[str]
    dropped: list[str]  # keys the format carries that ReIDViT does not use
    fresh: list[str]  # model keys left at initialisation
    resized: list[str]  # position embeddings resampled to the model's grid
    neck_feat: str = "after"  # the retrieval feature set on the model (default: the one the source evaluates with)
    notes: list[str] = field(default_factory=list)  # what was mapped beyond renaming
    plan: PrunePlan | None = None  # what the source had pruned (LA-Transformer token masks, heads)
    warnings: list[str] = field(default_factory=list)  # what the source holds that the import leaves out

    def summary(self) -> str:
        text = (f"imported {len(self.loaded)} tensors ({self.format}); dropped {len(self.dropped)} unused; "
                f"{len(self.fresh)} left fresh; resized: {', '.join(self.resized) or 'none'}; "
                f"retrieval feature: {describe_feature(self.neck_feat)}")
        return "; ".join([text, *self.notes])


def _numpy_number_globals() -> list[Any]:
    """What torch's weights-only unpickler needs to rebuild numpy numbers, and nothing that runs
    code: the reference's `prune()` counts heads as numpy.int64, which its `save_network` pickles
    beside the weights. numpy's scalar constructor (under its numpy 2 and numpy 1 names: a file
    names the one it was written with), `numpy.dtype`, and the dtype classes of booleans,
    integers and floats; not the object dtype, whose "scalar" may be any object."""
    import numpy as np

    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    numbers = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *(type(np.dtype(number)) for number in numbers)]


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


def _jpm_global_branch(state_dict: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """TransReID JPM: `b1` (last block + norm, trained for the global feature) replaces the base's
    last block and norm, which a JPM forward never runs. Returns (state dict, dropped keys)."""
    if not any(key.startswith("b1.") for key in state_dict):
        return state_dict, []
    last = f"base.blocks.{depth - 1}."
    unused = [key for key in state_dict if key.startswith((last, "base.norm."))]
    mapped = {key: value for key, value in state_dict.items() if key not in unused}
    for key in [key for key in mapped if key.startswith("b1.")]:
        part, _, rest = key[len("b1."):].partition(".")
        if part not in ("0", "1"):
            raise InputError(f"JPM branch key {key!r}: b1 holds a block (b1.0) and a norm (b1.1) only")
        mapped[(last if part == "0" else "base.norm.") + rest] = mapped.pop(key)
    return mapped, unused


def _token_mask(key: str, mask: torch.Tensor, num_tokens: int) -> list[int] | None:
    """The K/V positions a reference `token_index` mask keeps; None when it keeps all of them."""
    flat = mask.reshape(-1).bool()
    if flat.numel() == 0:  # all() of nothing is True: it would read as "unpruned"
        raise InputError(f"{key}: an empty token mask (shape {tuple(mask.shape)}); expected one entry per token")
    if bool(flat.all()):
        return None  # unpruned: whatever the source's grid was, nothing to carry over
    if flat.numel() != num_tokens:
        raise InputError(f"{key}: a pruned token mask of {flat.numel()} entries, the model has {num_tokens} "
                         "tokens: import at the input size the reference model was pruned at (--img-size)")
    kept = torch.nonzero(flat).reshape(-1).tolist()
    if 0 not in kept:
        raise InputError(f"{key}: the mask drops the class token (position 0)")
    return kept


def _kept_head_count(state_dict: dict[str, torch.Tensor], block: int, config: ModelConfig) -> int:
    """The heads a reference block keeps, read from its qkv rows (3 x head width per head): only
    the count survives physical slicing, not the original head numbers (0: an emptied block)."""
    key = f"model.blocks.{block}.attn.qkv.weight"
    qkv = state_dict.get(key)
    if qkv is None:
        return config.num_heads
    if qkv.dim() != 2 or qkv.shape[1] != config.embed_dim:
        raise InputError(f"{key}: shape {tuple(qkv.shape)}; expected (3 x kept heads x head width, "
                         f"{config.embed_dim})")
    head_rows = 3 * (config.embed_dim // config.num_heads)
    if qkv.shape[0] % head_rows or qkv.shape[0] // head_rows > config.num_heads:
        return config.num_heads  # not a whole number of heads: `load_exact` names the mismatch
    return qkv.shape[0] // head_rows


def _reference_plan(state_dict: dict[str, torch.Tensor], model: ReIDViT) -> tuple[PrunePlan | None, list[str]]:
    """What the AMG reference code pruned, read from its masks and qkv shapes (None: nothing),
    and warnings on what it holds that the plan leaves out."""
    config = model.config
    plan = PrunePlan.unpruned(config)
    warnings = []
    for block in range(config.depth):
        plan.kept_heads[block] = list(range(_kept_head_count(state_dict, block, config)))
        key = f"model.blocks.{block}.attn.token_index"
        if key in state_dict:
            plan.kept_tokens[block] = _token_mask(key, state_dict[key], config.num_tokens)
        if not plan.kept_heads[block] and plan.kept_tokens[block] is not None:
            # tokens pruned first, heads after: the reference's forward indexes keys no head has
            warnings.append(f"block {block} keeps no head, so its token mask ({len(plan.kept_tokens[block])} of "
                            f"{config.num_tokens} key/value positions) is ignored: the block's attention adds "
                            "only its projection's bias, as in the reference")
            plan.kept_tokens[block] = None
    heads_pruned = plan.heads_kept < config.depth * config.num_heads
    tokens_pruned = any(tokens is not None for tokens in plan.kept_tokens)
    if not (heads_pruned or tokens_pruned):
        return None, warnings
    patches = (config.num_tokens - 1) * config.depth
    dropped = sum(config.num_tokens - len(t) for t in plan.kept_tokens if t is not None)
    plan.policy = {"heads": "reference" if heads_pruned else "none", "tokens": "reference" if tokens_pruned else "none",
                   "allocation": "global"}
    plan.ratios = {"heads": round(1 - plan.heads_kept / (config.depth * config.num_heads), 4),
                   "tokens": round(dropped / patches, 4)}
    plan.calibration = {"source": "LA-Transformer checkpoint (token_index masks, qkv shapes); "
                                  "kept heads are renumbered 0..k-1: the original numbers are not saved"}
    return plan, warnings


def _saved_counts(payload: dict[str, Any], key: str, depth: int) -> list[int] | None:
    """A per-block count list the reference saves beside its weights, as ints (None: not saved)."""
    counts = payload.get(key)
    if counts is None:
        return None
    try:  # numpy integers (head counts) and one-element torch tensors (K/V counts) both index
        values = [operator.index(count) for count in counts]
    except TypeError as error:
        raise InputError(f"checkpoint entry {key!r} should list a whole number per block, got {counts!r}") from error
    if len(values) != depth:
        raise InputError(f"checkpoint entry {key!r} lists {len(values)} blocks, the model has {depth}: "
                         "import with the preset the reference model was built as (--preset)")
    return values


def _check_saved_counts(payload: dict[str, Any], state_dict: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """The reference builds its model from 'heads' and 'channels' (K/V positions, class token
    included) before loading the weights: a file whose lists disagree with its weights is damaged."""
    masks = [state_dict.get(f"model.blocks.{block}.attn.token_index") for block in range(config.depth)]
    found = {"heads": [_kept_head_count(state_dict, block, config) for block in range(config.depth)],
             "channels": [config.num_tokens if mask is None else int(mask.bool().sum()) for mask in masks]}
    for key, from_weights in found.items():
        saved = _saved_counts(payload, key, config.depth)
        if saved is not None and saved != from_weights:
            raise InputError(f"checkpoint entry {key!r} says {saved} per block, but its weights and token masks "
                             f"hold {from_weights}: a damaged or mixed-up reference checkpoint?")


def _la_transformer_extras(state_dict: dict[str, torch.Tensor], model: ReIDViT
                           ) -> tuple[dict[str, torch.Tensor], list[str], PrunePlan | None, list[str]]:
    """Drop the reference's aliases (checked equal) and token masks, and read its pruning plan
    (with warnings on what it leaves out)."""
    dropped = []
    for alias in ("cls_token", "pos_embed"):
        if alias in state_dict:
            original = state_dict.get(f"model.{alias}")
            if original is None or not torch.equal(state_dict[alias], original):
                raise InputError(f"checkpoint key {alias!r} should alias 'model.{alias}' (LA-Transformer saves "
                                 "the backbone's tensor twice) but differs from it: not an LA-Transformer checkpoint?")
            dropped.append(alias)
    plan, warnings = _reference_plan(state_dict, model)
    masks = [key for key in state_dict if re.fullmatch(r"model\.blocks\.\d+\.attn\.token_index", key)]
    kept = {key: value for key, value in state_dict.items() if key not in dropped and key not in masks}
    return kept, dropped + masks, plan, warnings


def import_state_dict(model: ReIDViT, source: str | Path | dict[str, Any], fmt: str = "auto",
                      source_grid: tuple[int, int] | None = None, neck_feat: str | None = None) -> ImportReport:
    """Load a foreign checkpoint into `model` in place, resizing the position embedding if needed,
    pruning it as the source was pruned (LA-Transformer masks), and choosing the retrieval
    feature: `neck_feat`, by default the one the source evaluates with."""
    name = str(source) if not isinstance(source, dict) else "<state dict>"
    payload = read_checkpoint(source, _numpy_number_globals()) if not isinstance(source, dict) else source
    if payload.get("format") == CHECKPOINT_FORMAT:
        raise InputError(f"{name} is already an amg model file ({CHECKPOINT_FORMAT}): no import needed, "
                         "use it as it is (amg eval / prune / export)")
    state_dict = _unwrap(payload)
    fmt = detect_format(state_dict) if fmt == "auto" else fmt
    notes, warnings, extra_dropped, plan = [], [], [], None
    if fmt == "transreid":
        state_dict, extra_dropped = _jpm_global_branch(state_dict, model.config.depth)
        if extra_dropped:
            notes.append(f"JPM: b1 is the last block and final norm ({len(extra_dropped)} unused base tensors dropped)")
    elif fmt == "la_transformer":
        la_state = state_dict
        state_dict, extra_dropped, plan, warnings = _la_transformer_extras(la_state, model)
        _check_saved_counts(payload, la_state, model.config)  # after the masks' own checks, which say more
        if plan is not None:
            apply_plan(model, plan)  # shapes first: pruned heads have smaller qkv/proj weights
            notes.append(f"pruned as the source: {plan.heads_kept} heads kept, token ratio {plan.ratios['tokens']:g}")
    renamed, dropped = rename_keys(state_dict, fmt)
    dropped += extra_dropped
    expected = model.state_dict()
    resized = _fit_position_embedding(renamed, expected, model, source_grid, _checkpoint_key(state_dict, renamed))
    # A classifier for another number of training identities is useless here: keep the fresh one.
    if "classifier.weight" in renamed and (
            "classifier.weight" not in expected or renamed["classifier.weight"].shape != expected["classifier.weight"].shape):
        dropped.append("classifier.weight")
        del renamed["classifier.weight"]
    fresh = [k for k in expected if k not in renamed and k.startswith(FRESH_OK.get(fmt, ()))]
    merged = {**{k: expected[k] for k in fresh}, **renamed}
    load_exact(model, merged, source=f"{name} (as {fmt})")
    feature = neck_feat or SOURCE_NECK_FEAT[fmt]
    set_neck_feat(model, feature)
    return ImportReport(fmt, sorted(renamed), sorted(dropped), sorted(fresh), resized, feature, notes, plan, warnings)


POSITION_KEY = "backbone.pos_embed"


def _checkpoint_key(state_dict: dict[str, torch.Tensor], renamed: dict[str, torch.Tensor]) -> str:
    """The checkpoint's name of the position embedding (renaming moves tensors, never copies them)."""
    position = renamed.get(POSITION_KEY)
    return next((key for key, value in state_dict.items() if value is position), POSITION_KEY)


def _fit_position_embedding(renamed: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: ReIDViT,
                            source_grid: tuple[int, int] | None, checkpoint_key: str) -> list[str]:
    """Resample the checkpoint's position embedding (in `renamed`, in place) to the model's grid;
    returns what was resized."""
    position, wanted = renamed.get(POSITION_KEY), expected[POSITION_KEY]
    if position is None or position.shape == wanted.shape:
        return []
    if position.dim() != 3 or position.shape[0] != 1 or position.shape[1] < 2:
        raise InputError(f"position embedding {checkpoint_key!r} (the model's {POSITION_KEY}) has shape "
                         f"{tuple(position.shape)}; expected (1, 1 + patches, width), here {tuple(wanted.shape)}")
    if position.shape[1] == wanted.shape[1]:
        return []  # the same tokens, another width: `load_exact` names it with every other mismatch
    grid = tuple(model.backbone.patch_embed.grid_size)
    old = _source_grid(position.shape[1] - 1, grid, source_grid)
    renamed[POSITION_KEY] = resample_abs_pos_embed(position, new_size=list(grid), old_size=list(old),
                                                   num_prefix_tokens=1)
    return [f"{POSITION_KEY} {old} -> {grid}"]
