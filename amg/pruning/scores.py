"""Head and token importance: AMG's attention-map scores and the baselines.

Two layers: `calibrate` runs a calibration set through the model once and returns plain
tensors (mean attention maps, attention x gradient sums, head-output x gradient sums);
the scoring functions below are pure functions of those tensors (or of the weights), as
ToMe keeps its merging math apart from its patching code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from amg.data.transforms import normalize
from amg.errors import InputError
from amg.model.attention import capture_attention, patch_model
from amg.pruning.calibration_loss import (
    augment,
    calibration_loss,
    calibration_mode,
    check_loss,
    default_teacher,
    teacher_target,
)
from amg.pruning.policies import CALIBRATION_BATCH, HEAD_ALLOCATIONS, REFERENCE_ALLOCATION

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

    mean_attention: list[torch.Tensor]  # [heads, N_q, N_kv]: attention averaged over `images`
    # None when calibrated without gradients:
    # [N_kv]: over all calibration batches, the sum of |mean over the batch's images, heads and
    # queries of A * dL/dA| (the reference's `seq_ranks += torch.abs(values)`)
    token_taylor: list[torch.Tensor] | None
    head_taylor: list[torch.Tensor] | None  # [heads]: sum over images of |sum(head output * dL/d output)|
    images: int
    loss: str
    # [hidden]: sum over images of |sum over tokens of MLP activation * dL/d activation|
    # (first-order Taylor importance of each hidden channel); None unless asked for
    mlp_taylor: list[torch.Tensor] | None = None
    # the images `token_taylor` adds up: every batch, a smaller last one too (`images` counts
    # those of `mean_attention`, `head_taylor` and `mlp_taylor`, which leave it out); 0 without gradients
    token_images: int = 0


def calibrate(model, images: torch.Tensor, labels: Sequence[int] | None = None,
              camids: Sequence[int] | None = None, loss: str = "id", teacher=None,
              batch_size: int = CALIBRATION_BATCH, gradients: bool = True,
              progress: Progress | None = None, seed: int = 0, mlp: bool = False) -> CalibrationStats:
    """Run uint8 `images` through `model` with attention capture (and backprop).

    In batches of `batch_size`, as the reference: token scores take the absolute value per
    batch (so the batch size matters) and add up every batch, a smaller last one included;
    the attention-map average (head entropy), the head-gradient and the MLP sums leave a
    smaller last batch out when there is at least one full batch (`_averaged_images`).

    loss="id": cross-entropy of the model's own classifier on `labels` (train-set labels), eval mode.
    loss="distill": squared distance of the class-token features to `teacher`'s (label-free;
    the teacher must differ from the model, e.g. the unpruned model during iterative pruning).
    loss="reference": the reference's training-epoch calibration (`amg.pruning.calibration_loss`);
    `teacher` defaults to the model as it is now, `seed` fixes its flips and dropout.
    gradients=False skips the backward pass: enough for entropy, which needs only the maps.
    mlp=True (with gradients) also sums the MLP channels' Taylor importance.
    """
    check_loss(loss, teacher)
    teacher = default_teacher(loss, teacher, model)
    if len(images) == 0:
        raise InputError("calibration needs at least one image")
    if batch_size < 1:
        raise InputError(f"the calibration batch size must be >= 1, got {batch_size}")
    averaged = _averaged_images(len(images), batch_size)
    scored = _token_scored_images(len(images), averaged, gradients, loss)
    modules = patch_model(model)
    device = next(model.parameters()).device
    needs_camids = model.sie_embed is not None
    attention_sums: list[torch.Tensor | float] = [0.0] * len(modules)
    token_taylor: list[torch.Tensor | float] = [0.0] * len(modules)
    head_taylor: list[torch.Tensor | float] = [0.0] * len(modules)
    mlp_taylor: list[torch.Tensor | float] = [0.0] * len(modules)
    # Only activation gradients are needed: freezing the weights skips every weight-gradient matmul.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with calibration_mode(model, loss, seed) as flips:
            for start in range(0, scored, batch_size):
                in_average = start < averaged
                batch = augment(normalize(images[start:start + batch_size].to(device)), flips)
                batch.requires_grad_(gradients)
                cams = torch.as_tensor(camids[start:start + batch_size], device=device) if needs_camids else None
                batch_labels = None if labels is None else torch.as_tensor(labels[start:start + batch_size],
                                                                           device=device)
                target = teacher_target(loss, teacher, batch.detach(), cams) if gradients else None
                with torch.set_grad_enabled(gradients), capture_attention(model, retain_grad=gradients) as capture, \
                        _mlp_activations(model, mlp and gradients and in_average) as activations:
                    if gradients:
                        calibration_loss(model, batch, batch_labels, cams, loss, target).backward()
                    else:
                        model.forward_tokens(batch, cams)
                for block in range(len(modules)):
                    if modules[block].num_heads == 0:  # an emptied block has no attention to score
                        continue
                    (attn,) = capture.maps(block)
                    if gradients:
                        batch_mean = (attn.detach() * attn.grad).mean(dim=(0, 1, 2))
                        token_taylor[block] = token_taylor[block] + batch_mean.abs()
                    if not in_average:
                        continue
                    attention_sums[block] = attention_sums[block] + attn.detach().sum(dim=0)
                    if gradients:
                        (output,) = capture.head_outputs(block)
                        per_image = (output.detach() * output.grad).sum(dim=(2, 3)).abs()  # [B, heads]
                        head_taylor[block] = head_taylor[block] + per_image.sum(dim=0)
                for block, hidden in activations.items():
                    per_image = (hidden.detach() * hidden.grad).sum(dim=1).abs()  # [B, channels]
                    mlp_taylor[block] = mlp_taylor[block] + per_image.sum(dim=0)
                if progress:
                    progress(f"calibration {min(start + batch_size, scored)}/{scored} images")
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    tokens = model.config.num_tokens

    def per_block(sums: list, empty_shape: tuple[int, ...], scale: float = 1.0) -> list[torch.Tensor]:
        # an emptied block added nothing (still the float 0): zero heads, zero token scores
        return [torch.zeros(empty_shape) if isinstance(total, float) else total / scale for total in sums]

    return CalibrationStats(per_block(attention_sums, (0, tokens, tokens), averaged),
                            per_block(token_taylor, (tokens,)) if gradients else None,
                            per_block(head_taylor, (0,)) if gradients else None, averaged, loss,
                            per_block(mlp_taylor, (0,)) if mlp and gradients else None,
                            scored if gradients else 0)


def _averaged_images(count: int, batch_size: int) -> int:
    """The images of the batches of the first batch's size: the reference adds a batch's maps
    to its running sum only when the shapes match (`if self.attn.shape[0] == attn.shape[0]`),
    so a smaller last batch is left out of the head entropy, unless it is the only batch."""
    return count - count % batch_size if count >= batch_size else count


def _token_scored_images(count: int, averaged: int, gradients: bool, loss: str) -> int:
    """The images whose batches add to the token scores: all of them, as the reference's
    gradient hook (`seq_ranks += ...`) fires for every batch of its loader (no `drop_last`).

    Without gradients there are no token scores, so the smaller last batch is not run. Under
    the "reference" loss (train mode) a last batch of one image is left out: BatchNorm cannot
    take batch statistics of a single image (the reference's loader stops with an error there).
    """
    if not gradients or (loss == "reference" and count - averaged == 1):
        return averaged
    return count


@contextlib.contextmanager
def _mlp_activations(model, enabled: bool) -> Iterator[dict[int, torch.Tensor]]:
    """{block: the MLP's hidden activation [B, N, channels]} of the forward run inside, with its
    gradient kept for after the backward pass."""
    found: dict[int, torch.Tensor] = {}
    handles = []

    def keep(block: int):
        def hook(module, inputs, output):
            output.retain_grad()
            found[block] = output
        return hook

    if enabled:
        handles = [layer.mlp.act.register_forward_hook(keep(index))
                   for index, layer in enumerate(model.backbone.blocks)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


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

    global: the reference's layer scale (1 + 0.02·l) then one ranking across blocks, where l
    counts only the blocks still ranked (more than one head), as the reference does.
    keep-one: the same with l the block's index (the ranking keeps a head in every block).
    per-block: the same ranking used inside each block (`amg.pruning.selection.select_heads`).
    normalized: entropy divided by its maximum log2(N_kv), so blocks compare fairly.
    """
    if allocation not in HEAD_ALLOCATIONS:
        raise InputError(f"unknown head allocation {allocation!r}; choose one of {HEAD_ALLOCATIONS}")
    scores = []
    ranked = 0
    for block, attention in enumerate(calibration.mean_attention):
        entropy = head_entropy(attention)
        if allocation == REFERENCE_ALLOCATION:
            entropy = entropy * (1 + HEAD_LAYER_SCALE * ranked)
            ranked += attention.shape[0] > 1
        elif allocation == "keep-one":
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
        if heads == 0:
            scores.append(torch.zeros(0))
            continue
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
    """AMG: per key, the batches' |mean A·dL/dA| summed, L2-normalised per block, scaled by (1 - 0.03·l)."""
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


# --------------------------------------------------------------------------- MLP channel scores
# Every MLP scorer returns, per block, a [channels] tensor (the block's current hidden
# channels) where HIGHER means KEEP.


def taylor_channel_keep_scores(model, calibration: CalibrationStats, allocation: str = "global",
                               seed: int = 0) -> list[torch.Tensor]:
    """First-order Taylor (Molchanov et al. 2019): E|sum over tokens of activation x gradient|."""
    if calibration.mlp_taylor is None:
        raise InputError("Taylor MLP scores need a calibration with gradients and MLP capture")
    return [taylor / max(calibration.images, 1) for taylor in calibration.mlp_taylor]


def magnitude_channel_keep_scores(model, calibration: CalibrationStats | None = None, allocation: str = "global",
                                  seed: int = 0) -> list[torch.Tensor]:
    """L2 norm of a channel's fc1 row times that of its fc2 column."""
    return [layer.mlp.fc1.weight.detach().norm(dim=1) * layer.mlp.fc2.weight.detach().norm(dim=0)
            for layer in model.backbone.blocks]


def random_channel_keep_scores(model, calibration: CalibrationStats | None = None, allocation: str = "global",
                               seed: int = 0) -> list[torch.Tensor]:
    return _uniform([layer.mlp.fc1.out_features for layer in model.backbone.blocks], seed)
