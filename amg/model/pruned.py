"""Pruned models: apply a plan to a model, read it back, save and load pruned model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amg.model.attention import patch_model
from amg.model.dynamic import apply_dynamic
from amg.model.mlp import keep_mlp_channels
from amg.model.plan import PrunePlan
from amg.model.vit import ReIDViT, load_model, save_model


def apply_plan(model: ReIDViT, plan: PrunePlan) -> ReIDViT:
    """Prune `model` in place to `plan` (it may already be pruned to a superset of the plan)."""
    plan.check_fits(model.config)
    for module, heads, tokens in zip(patch_model(model), plan.kept_heads, plan.kept_tokens):
        if sorted(heads) != sorted(module.head_ids):
            module.keep_heads(heads)
        module.keep_tokens(tokens, model.config.num_tokens)
    for block, (layer, channels) in enumerate(zip(model.backbone.blocks, plan.kept_mlp or [])):
        if channels is not None:
            keep_mlp_channels(layer.mlp, channels, block)
    if plan.dynamic_tokens is not None:
        apply_dynamic(model, plan.dynamic_tokens["policy"], plan.dynamic_tokens["amount"],
                      plan.dynamic_tokens.get("blocks"))
    model.plan = plan
    return model


def current_plan(model: ReIDViT) -> PrunePlan:
    return getattr(model, "plan", None) or PrunePlan.unpruned(model.config)


# ------------------------------------------------------------------------------ save and load


def save_pruned(model: ReIDViT, path: str | Path, **meta: Any) -> Path:
    """An amg model file with the plan inside (and whether the last block is computed for the
    class token only); `load_pruned` rebuilds the shapes and that choice from it."""
    extra = {"plan": current_plan(model).to_dict(), "class_token_block": model.class_token_only}
    return save_model(model, path, extra=extra, **meta)


def _apply_saved_plan(model: ReIDViT, payload: dict[str, Any]) -> None:
    if payload.get("plan") is not None:
        apply_plan(model, PrunePlan.from_dict(payload["plan"]))
    model.use_class_token_last_block(bool(payload.get("class_token_block")))


def load_pruned(path: str | Path) -> ReIDViT:
    """Load any amg model file, pruned (with a plan) or not, in eval mode."""
    return load_model(path, prepare=_apply_saved_plan)
