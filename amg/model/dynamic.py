"""Dynamic token baselines: EViT-style token dropping and ToMe-style bipartite merging.

Unlike AMG's static key/value pruning, these shrink the whole token sequence (queries too)
inside chosen blocks, deciding per image. The math lives in pure functions on tensors
(`evit_reduce`, `bipartite_merge`), as in ToMe's `merge.py`; `apply_dynamic` patches a
model's blocks in place. Shapes stay fixed for a given input size: EViT keeps a fixed
count and ToMe merges a fixed `r` per block, so fvcore counts them like any other model.

Choices (documented rather than hidden): EViT keeps round(keep_rate * patches) attentive
tokens by the class token's head-averaged attention and fuses the rest into one token
(their attention-weighted mean), in the blocks named; ToMe merges r tokens per block by
cosine similarity of the head-averaged keys, with size-weighted averages, protecting the
class token; ToMe's proportional attention is left out, so the fused SDPA path stays.
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from amg.errors import InputError
from amg.model.attention import patch_model

# The token policies whose blocks this module implements (amg.pruning.policies names them too).
IMPLEMENTED = ("evit", "tome")


def evit_reduce(x: torch.Tensor, cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """`x` `[B, N, D]` (class token first), `cls_attention` `[B, N-1]` over the patch tokens.

    Returns `[B, 1 + keep + 1, D]`: class token, the `keep` most attended tokens in their
    original order, and one token fusing the others weighted by their attention.
    """
    patches = x[:, 1:]
    if not 0 < keep < patches.shape[1]:
        raise InputError(f"EViT keeps between 1 and {patches.shape[1] - 1} tokens, asked for {keep}")
    order = cls_attention.argsort(dim=1, descending=True)
    kept_index = order[:, :keep].sort(dim=1).values
    dropped_index = order[:, keep:]
    width = x.shape[-1]
    kept = patches.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, width))
    dropped = patches.gather(1, dropped_index.unsqueeze(-1).expand(-1, -1, width))
    weights = cls_attention.gather(1, dropped_index)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    fused = (dropped * weights.unsqueeze(-1)).sum(dim=1, keepdim=True)
    return torch.cat([x[:, :1], kept, fused], dim=1)


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: merge `r` tokens of set A (even positions) into set B.

    `x` `[B, N, D]`, `size` `[B, N, 1]` tokens merged into each, `metric` `[B, N, C]`
    (head-averaged keys). The class token (position 0, in A) never merges. Returns the
    merged `x` and `size`, `N - r` tokens each.
    """
    a_count = (int(x.shape[1]) + 1) // 2
    r = min(r, a_count - 1)  # the class token stays in A
    if r <= 0:
        return x, size
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -torch.inf  # protect the class token
    best_score, best_b = scores.max(dim=-1)
    edge_order = best_score.argsort(dim=-1, descending=True)[..., None]
    # Sorting the unmerged A tokens keeps their order, so the class token stays first (as ToMe).
    merged_a, kept_a = edge_order[:, :r], edge_order[:, r:].sort(dim=1).values
    target_b = best_b[..., None].gather(1, merged_a)

    def merge(values: torch.Tensor, reduce: str) -> torch.Tensor:
        src, dst = values[:, ::2], values[:, 1::2]
        width = values.shape[-1]
        unmerged = src.gather(1, kept_a.expand(-1, -1, width))
        moving = src.gather(1, merged_a.expand(-1, -1, width))
        dst = dst.scatter_reduce(1, target_b.expand(-1, -1, width), moving, reduce=reduce)
        return torch.cat([unmerged, dst], dim=1)

    # Size-weighted average: merge size-scaled sums, then divide by the merged size.
    merged_x = merge(x * size, "sum")
    merged_size = merge(size, "sum")
    return merged_x / merged_size, merged_size


class DynamicTokenBlock(Block):
    """A timm Block whose token sequence shrinks after its attention (EViT or ToMe).

    Applied by swapping a Block's class in place (as ToMe does): parameter names, and so
    state dicts, stay those of the timm model.
    """

    policy: str
    amount: float
    sizes: dict  # shared by a model's ToMe blocks: how many tokens each token stands for

    @classmethod
    def convert(cls, block: Block, policy: str, amount: float, sizes: dict) -> DynamicTokenBlock:
        if block.attn.num_heads == 0:
            raise InputError("dynamic token policies read each block's attention: this block has no head left")
        if block.attn.kv_index is not None:
            raise InputError("dynamic token policies need all key/value positions: this block has a static "
                             "K/V index (combine them with head pruning only)")
        block.__class__ = cls
        block.policy, block.amount, block.sizes = policy, amount, sizes
        return block

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        out, keys, cls_attention = self.attn.forward_with_cues(self.norm1(x))
        x = x + self.drop_path1(self.ls1(out))
        if self.policy == "evit":
            keep = max(1, round(self.amount * (int(x.shape[1]) - 1)))  # int(): fvcore traces shapes as tensors
            x = evit_reduce(x, cls_attention[:, :, 1:].mean(dim=1), keep)
        else:
            size = self.sizes.get("size")
            if size is None or size.shape[:2] != x.shape[:2]:  # a new forward pass starts full size
                size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=x.dtype)
            x, self.sizes["size"] = bipartite_merge(x, size, keys.mean(dim=1), int(self.amount))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def apply_dynamic(model: nn.Module, policy: str, amount: float | int, blocks: Sequence[int] | None = None) -> nn.Module:
    """Patch `model` in place. EViT: `amount` = keep rate in (0, 1), default blocks at 1/4, 1/2,
    3/4 of the depth (EViT's 4, 7, 10 of 12, 1-based). ToMe: `amount` = r tokens merged per
    block, default every block."""
    patch_model(model)
    depth = len(model.backbone.blocks)
    if policy == "evit":
        if not 0 < amount < 1:
            raise InputError(f"EViT keep rate must be in (0, 1), got {amount}")
        blocks = blocks if blocks is not None else sorted({depth // 4, depth // 2, 3 * depth // 4})
    elif policy == "tome":
        if int(amount) != amount or amount < 1:
            raise InputError(f"ToMe merges a whole number r >= 1 of tokens per block, got {amount}")
        blocks = blocks if blocks is not None else range(depth)
    else:
        raise InputError(f"unknown dynamic token policy {policy!r}; choose one of {IMPLEMENTED}")
    sizes: dict = {}
    for index in blocks:
        if not 0 <= index < depth:
            raise InputError(f"block {index} does not exist (depth {depth})")
        DynamicTokenBlock.convert(model.backbone.blocks[index], policy, amount, sizes)
    model.dynamic_tokens = {"policy": policy, "amount": amount, "blocks": list(blocks)}
    return model
