"""Torch-Pruning as a peer: its pruner chooses the heads and MLP channels, a plan applies them.

Torch-Pruning (DepGraph) is what most users would reach for to prune a timm ViT: it groups
coupled layers through a dependency graph and ranks whole groups (an attention head: its
qkv rows and proj columns; an MLP channel: an fc1 row and an fc2 column) by Group-Taylor or
magnitude importance, globally over blocks. Its choice is read from the pruner's interactive
step (the indices each group would lose) and becomes a `PrunePlan`: the peer's model is then
the same dense model every plan makes, saved, fine-tuned, exported and timed by the same code.
The embedding and head widths, the patch embedding and the neck are left alone (ignored
layers), as this project's own plans leave them.
"""

from __future__ import annotations

import copy

import torch

from amg.data.transforms import normalize
from amg.errors import InputError, Unplannable
from amg.model.plan import PrunePlan
from amg.model.pruned import current_plan
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages, Progress
from amg.pruning.calibration_loss import augment, calibration_loss, calibration_mode, teacher_target
from amg.pruning.policies import HEADS, TORCH_PRUNING, policy
from amg.pruning.ratio_search import plan_saving, smallest_ratio
from amg.pruning.selection import check_ratio

# Torch-Pruning's importance class behind each peer policy
IMPORTANCE = {"tp-taylor": "GroupTaylorImportance", "tp-magnitude": "GroupMagnitudeImportance"}
MAX_PEER_RATIO = 0.95
SEARCH_STEPS = 14  # bisection steps of the MACs-target search (each runs the pruner once)


class PeerUnavailable(Unplannable):
    """The peer library is not installed."""


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:
        raise PeerUnavailable(f"{TORCH_PRUNING} is not installed: pip install -e \".[peers]\" "
                              "(or pip install torch-pruning)") from error
    return torch_pruning


def peer_plan(model: ReIDViT, heads: float, mlp: float, name: str, data: CalibrationImages | None = None,
              progress: Progress | None = None) -> PrunePlan:
    """The plan Torch-Pruning's `name` policy makes for the unpruned `model`: `heads` of all heads
    (its head ratio) and its channel ratio `mlp` (ranked with the other width groups, so the share
    of MLP channels removed is what its ranking gives; the plan records it)."""
    check_ratio("head", heads)
    check_ratio("MLP channel", mlp)
    return _plan_from_pruner(_scoring_copy(model, name, data, progress), heads, mlp, name, data)


def peer_plan_for_saving(model: ReIDViT, target: float, name: str, data: CalibrationImages | None = None,
                         progress: Progress | None = None, heads: bool = True, mlp: bool = True) -> PrunePlan:
    """The plan removing about `target` of the model's fvcore MACs by one ratio for the head and
    channel ratios (those of `heads` and `mlp` that are pruned), found by bisection; or OutOfReach."""
    work = _scoring_copy(model, name, data, progress)
    saving_of = plan_saving(work)

    def plan_at(ratio: float) -> PrunePlan:
        return _plan_from_pruner(work, ratio if heads else 0.0, ratio if mlp else 0.0, name, data)

    if progress:
        progress(f"searching the {name} ratio that saves {target:.0%} of MACs")
    ratio = smallest_ratio(lambda r: saving_of(plan_at(r)), target, name, MAX_PEER_RATIO, SEARCH_STEPS)
    plan = plan_at(ratio)  # the pruner is deterministic: the plan the search ended on
    plan.ratios["target_macs_saving"] = target
    return plan


def _scoring_copy(model: ReIDViT, name: str, data: CalibrationImages | None, progress: Progress | None) -> ReIDViT:
    """A copy of the unpruned `model` for the pruner; for Taylor importance, holding the weight
    gradients of the calibration loss summed over the calibration images."""
    chosen = policy(HEADS, name)
    if not chosen.peer:
        raise InputError(f"{name!r} is not a {TORCH_PRUNING} policy; choose one of {', '.join(IMPORTANCE)}")
    if current_plan(model).to_dict() != PrunePlan.unpruned(model.config).to_dict():
        raise InputError(f"{TORCH_PRUNING} plans start from the unpruned model: this one is pruned already")
    _torch_pruning()
    work = copy.deepcopy(model).eval()
    work.class_token_only = False  # the pruner traces every token through every block
    if not chosen.gradients:
        return work
    if data is None:
        raise InputError(f"{name} needs calibration data (its importance is |weight x gradient|)")
    if progress:
        progress(f"{name}: weight gradients on {len(data.images)} calibration images")
    teacher = data.with_teacher(model).teacher
    work.zero_grad(set_to_none=True)
    with calibration_mode(work, data.loss, data.seed) as flips:
        for start in range(0, len(data.images), data.batch_size):
            batch = augment(normalize(data.images[start:start + data.batch_size]), flips)
            end = start + len(batch)
            cams = torch.as_tensor(data.camids[start:end]) if work.sie_embed is not None else None
            labels = None if data.labels is None else torch.as_tensor(data.labels[start:end])
            target = teacher_target(data.loss, teacher, batch, cams)
            calibration_loss(work, batch, labels, cams, data.loss, target).backward()
    return work


def _plan_from_pruner(work: ReIDViT, heads: float, mlp: float, name: str, data: CalibrationImages | None) -> PrunePlan:
    """Run Torch-Pruning's MetaPruner once on `work` (unpruned, gradients in place for Taylor) and
    read which heads and MLP channels its groups would lose; `work` itself is not pruned."""
    config = work.config
    head_dim = config.embed_dim // config.num_heads
    vit = work.backbone
    qkv = {block.attn.qkv: index for index, block in enumerate(vit.blocks)}
    fc1 = {block.mlp.fc1: index for index, block in enumerate(vit.blocks)}
    pruner = make_pruner(work, heads, mlp, name)
    removed_heads: list[set[int]] = [set() for _ in vit.blocks]
    removed_channels: list[set[int]] = [set() for _ in vit.blocks]
    for group in pruner.step(interactive=True):  # not pruned: only the choice is wanted
        for dep, indices in group:
            if not pruner.DG.is_out_channel_pruning_fn(dep.handler):
                continue
            if dep.target.module in qkv:
                removed_heads[qkv[dep.target.module]] |= _whole_heads(indices, config.embed_dim, head_dim)
            elif dep.target.module in fc1:
                removed_channels[fc1[dep.target.module]] |= set(map(int, indices))
    plan = PrunePlan.unpruned(config)
    plan.kept_heads = [[h for h in range(config.num_heads) if h not in gone] for gone in removed_heads]
    plan.kept_mlp = [[c for c in range(config.mlp_hidden) if c not in gone] if gone else None
                     for gone in removed_channels]
    if all(kept is None for kept in plan.kept_mlp):
        plan.kept_mlp = None
    total_heads = config.depth * config.num_heads
    plan.policy = {"heads": name if heads else "none", "tokens": "none", "allocation": "global"}
    plan.ratios = {"heads": round(sum(map(len, removed_heads)) / total_heads, 4), "tokens": 0.0,
                   "peer_head_ratio": heads, "peer_channel_ratio": mlp}
    if mlp:
        plan.policy["mlp"] = name
        plan.ratios["mlp"] = round(sum(map(len, removed_channels)) / (config.depth * config.mlp_hidden), 4)
    plan.calibration = dict(data.description) if data is not None and policy(HEADS, name).gradients else {}
    return plan


def make_pruner(model: ReIDViT, heads: float, mlp: float, name: str):
    """Torch-Pruning's MetaPruner for `model`: global ranking, whole heads (`heads` of them) and
    width groups at ratio `mlp`; the embedding width (the residual stream) is never pruned."""
    tp = _torch_pruning()
    config = model.config
    vit = model.backbone
    ignored = [vit.patch_embed, vit.norm, model.neck, *(b.attn.proj for b in vit.blocks),
               *(b.mlp.fc2 for b in vit.blocks), *([model.classifier] if model.classifier is not None else [])]
    camids = torch.zeros(1, dtype=torch.long) if model.sie_embed is not None else None
    # Parameters outside any layer, along the embedding width (which no group here prunes)
    embedding_wide = [(p, p.dim() - 1) for p in (vit.cls_token, vit.pos_embed, model.sie_embed) if p is not None]
    return tp.pruner.MetaPruner(
        model, torch.zeros(1, 3, *config.img_size), importance=getattr(tp.importance, IMPORTANCE[name])(),
        global_pruning=True, pruning_ratio=mlp, head_pruning_ratio=heads,
        num_heads={block.attn.qkv: config.num_heads for block in vit.blocks}, prune_num_heads=heads > 0,
        prune_head_dims=False, ignored_layers=ignored, unwrapped_parameters=embedding_wide,
        forward_fn=lambda model, images: model.forward_tokens(images, camids))


def _whole_heads(indices, dim: int, head_dim: int) -> set[int]:
    """The heads whose q, k and v rows `indices` (of a fused qkv layer) all remove."""
    rows = set(map(int, indices))
    heads = {(row % dim) // head_dim for row in rows}
    whole = {h for h in heads if all(part * dim + h * head_dim + i in rows
                                     for part in range(3) for i in range(head_dim))}
    if whole != heads or len(rows) != 3 * head_dim * len(heads):
        raise InputError(f"{TORCH_PRUNING} removed parts of heads (rows {sorted(rows)[:8]}...): only whole heads "
                         "can become a plan (prune_head_dims must stay off)")
    return whole
