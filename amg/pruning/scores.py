"""Head and token importance: AMG's attention-map scores and the baselines.

Two layers: `calibrate` runs a calibration set through the model once and returns plain
tensors (mean attention maps, attention x gradient sums, head-output x gradient sums);
the scoring functions below are pure functions of those tensors (or of the weights), as
ToMe keeps its merging math apart from its patching code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from amg.data.transforms import normalize
from amg.errors import InputError
from amg.model.attention import capture_attention, patch_model
from amg.pruning.policies import CALIBRATION_BATCH, HEAD_ALLOCATIONS

# The reference scales block l's head entropy by (1 + HEAD_LAYER_SCALE * l) before the
# global ranking, so deeper heads look slightly more diffuse (more removable).
HEAD_LAYER_SCALE = 0.02
# The reference scales block l's L2-normalised token scores by (1 - TOKEN_DEPTH_DECAY * l),
# so deeper blocks lose key/value positions first.
TOKEN_DEPTH_DECAY = 0.03

Progress = Callable[[str], None]


@dataclass
class CalibrationStats:
    """What the calibration pass measured, per block (indices follow the model's current heads)."""

    mean_attention: list[torch.Tensor]  # [heads, N_q, N_kv]: attention averaged over images
    # None when calibrated without gradients:
    # [N_kv]: over calibration batches, the sum of |mean over the batch's images, heads and
    # queries of A * dL/dA| (the reference's `seq_ranks += torch.abs(values)`)
    token_taylor: list[torch.Tensor] | None
    head_taylor: list[torch.Tensor] | None  # [heads]: sum over images of |sum(head output * dL/d output)|
    images: int
    loss: str


def _loss(model, images: torch.Tensor, labels: torch.Tensor | None, camids: torch.Tensor | None,
          teacher_features: torch.Tensor | None) -> torch.Tensor:
    features = model.forward_tokens(images, camids)[:, 0]
    if teacher_features is not None:  # label-free: stay close to the unpruned model's features
        return (features - teacher_features).pow(2).sum(dim=1).mean()
    if model.classifier is None or labels is None:
        raise InputError("calibration with the ID loss needs labels and a model with a classifier; "
                         "use loss='distill' with a teacher model otherwise")
    return F.cross_entropy(model.classifier(model.neck(features)), labels)


def calibrate(model, images: torch.Tensor, labels: Sequence[int] | None = None,
              camids: Sequence[int] | None = None, loss: str = "id", teacher=None,
              batch_size: int = CALIBRATION_BATCH, gradients: bool = True,
              progress: Progress | None = None) -> CalibrationStats:
    """Run uint8 `images` through `model` (eval mode) with attention capture (and backprop).

    In batches of `batch_size`, as the reference: token scores take the absolute value per
    batch (so the batch size matters), and a smaller last batch is left out when there is at
    least one full batch (the reference's loader drops it), from the maps too.

    loss="id": cross-entropy of the model's own classifier on `labels` (train-set labels).
    loss="distill": squared distance of the class-token features to `teacher`'s (label-free;
    the teacher must differ from the model, e.g. the unpruned model during iterative pruning).
    gradients=False skips the backward pass: enough for entropy, which needs only the maps.
    """
    if loss not in ("id", "distill"):
        raise InputError(f"unknown calibration loss {loss!r}; use 'id' or 'distill'")
    if loss == "distill" and teacher is None:
        raise InputError("loss='distill' needs a teacher model (e.g. the unpruned model)")
    if len(images) == 0:
        raise InputError("calibration needs at least one image")
    if batch_size < 1:
        raise InputError(f"the calibration batch size must be >= 1, got {batch_size}")
    used = len(images) - len(images) % batch_size if len(images) >= batch_size else len(images)
    modules = patch_model(model)
    model.eval()
    device = next(model.parameters()).device
    needs_camids = model.sie_embed is not None
    attention_sums: list[torch.Tensor | float] = [0.0] * len(modules)
    token_taylor: list[torch.Tensor | float] = [0.0] * len(modules)
    head_taylor: list[torch.Tensor | float] = [0.0] * len(modules)
    # Only activation gradients are needed: freezing the weights skips every weight-gradient matmul.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        for start in range(0, used, batch_size):
            batch = normalize(images[start:start + batch_size].to(device)).requires_grad_(gradients)
            cams = torch.as_tensor(camids[start:start + batch_size], device=device) if needs_camids else None
            batch_labels = None if labels is None else torch.as_tensor(labels[start:start + batch_size], device=device)
            target = None
            if loss == "distill" and gradients:
                with torch.no_grad():
                    target = teacher.eval().forward_tokens(batch, cams)[:, 0]
            with torch.set_grad_enabled(gradients), capture_attention(model, retain_grad=gradients) as capture:
                if gradients:
                    _loss(model, batch, batch_labels, cams, target).backward()
                else:
                    model(batch, cams)
            for block in range(len(modules)):
                (attn,) = capture.maps(block)
                attention_sums[block] = attention_sums[block] + attn.detach().sum(dim=0)
                if gradients:
                    (output,) = capture.head_outputs(block)
                    batch_mean = (attn.detach() * attn.grad).mean(dim=(0, 1, 2))
                    token_taylor[block] = token_taylor[block] + batch_mean.abs()
                    per_image = (output.detach() * output.grad).sum(dim=(2, 3)).abs()  # [B, heads]
                    head_taylor[block] = head_taylor[block] + per_image.sum(dim=0)
            if progress:
                progress(f"calibration {min(start + batch_size, used)}/{used} images")
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    count = used
    return CalibrationStats([s / count for s in attention_sums], token_taylor if gradients else None,
                       head_taylor if gradients else None, count, loss)


# ------------------------------------------------------------------------------ head scores
# Every head scorer returns, per block, a [heads] tensor where HIGHER means REMOVE FIRST.


def head_entropy(mean_attention: torch.Tensor) -> torch.Tensor:
    """[heads]: mean over queries of the key-wise entropy (bits) of the mean attention map."""
    p = mean_attention.clamp_min(0)
    plogp = torch.where(p > 0, p * torch.log2(p.clamp_min(1e-30)), torch.zeros_like(p))  # 0·log0 = 0
    return (-plogp.sum(dim=-1)).mean(dim=-1)


# Scorers named in amg.pruning.policies share one signature: (model, calibration, allocation, seed).


def amg_head_removal_scores(model, calibration: CalibrationStats, allocation: str = "global",
                            seed: int = 0) -> list[torch.Tensor]:
    """AMG: high entropy (diffuse attention) goes first.

    global: the reference's layer scale (1 + 0.02·l) then one ranking across blocks.
    per-block: the same ranking used inside each block (`amg.pruning.selection.select_heads`).
    normalized: entropy divided by its maximum log2(N_kv), so blocks compare fairly.
    """
    if allocation not in HEAD_ALLOCATIONS:
        raise InputError(f"unknown head allocation {allocation!r}; choose one of {HEAD_ALLOCATIONS}")
    scores = []
    for block, attention in enumerate(calibration.mean_attention):
        entropy = head_entropy(attention)
        if allocation == "global":
            entropy = entropy * (1 + HEAD_LAYER_SCALE * block)
        elif allocation == "normalized":
            entropy = entropy / math.log2(attention.shape[-1])
        scores.append(entropy)
    return scores


def lowest_entropy_removal_scores(model, calibration: CalibrationStats, allocation: str = "global",
                                  seed: int = 0) -> list[torch.Tensor]:
    """The opposite rule (a baseline): focused heads go first."""
    return [-head_entropy(attention) for attention in calibration.mean_attention]


def gradient_removal_scores(model, calibration: CalibrationStats, allocation: str = "global",
                            seed: int = 0) -> list[torch.Tensor]:
    """Michel et al. 2019: E|sum(head output · dL/d output)|, L2-normalised per block; low goes first."""
    if calibration.head_taylor is None:
        raise InputError("gradient head scores need a calibration with gradients")
    return [-(t / t.norm().clamp_min(1e-12)) for t in calibration.head_taylor]


def magnitude_removal_scores(model, calibration: CalibrationStats | None = None, allocation: str = "global",
                             seed: int = 0) -> list[torch.Tensor]:
    """Weight magnitude: L2 norm of a head's q, k, v rows and proj columns; small goes first."""
    scores = []
    for module in patch_model(model):
        heads, dim = module.num_heads, module.head_dim
        qkv = module.qkv.weight.detach().reshape(3, heads, dim, -1).pow(2).sum(dim=(0, 2, 3))
        proj = module.proj.weight.detach().reshape(-1, heads, dim).pow(2).sum(dim=(0, 2))
        scores.append(-(qkv + proj).sqrt())
    return scores


def random_removal_scores(model, calibration: CalibrationStats | None = None, allocation: str = "global",
                          seed: int = 0) -> list[torch.Tensor]:
    return _uniform([module.num_heads for module in patch_model(model)], seed)


# ----------------------------------------------------------------------------- token scores
# Every token scorer returns, per block, a [N_kv] tensor where HIGHER means KEEP.
# Position 0 (the class token) is never scored: callers always keep it.


def amg_token_keep_scores(model, calibration: CalibrationStats, allocation: str = "global",
                          seed: int = 0) -> list[torch.Tensor]:
    """AMG: |sum A·dL/dA| per key, L2-normalised per block, scaled by (1 - 0.03·l)."""
    if calibration.token_taylor is None:
        raise InputError("AMG token scores need a calibration with gradients")
    scores = []
    for block, taylor in enumerate(calibration.token_taylor):
        s = taylor.abs()
        s = s / s[1:].norm().clamp_min(1e-12)
        scores.append(s * (1 - TOKEN_DEPTH_DECAY * block))
    return scores


def random_token_keep_scores(model, calibration: CalibrationStats | None = None, allocation: str = "global",
                             seed: int = 0) -> list[torch.Tensor]:
    return _uniform([model.config.num_tokens] * model.config.depth, seed)


def _uniform(counts: Sequence[int], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(count, generator=generator) for count in counts]
