"""LA-Transformer's test-time feature, which the AMG reference code evaluates with.

`LATransformerTest` (LATransformer/model.py) runs the blocks and the final norm, pools the
patch tokens with `AdaptiveAvgPool2d((14, embed_dim))` (14 parts along the token sequence,
class token left out), and test.py divides each part by its L2 norm times sqrt(14) and
concatenates them: one unit-length vector, searched by inner product. The class token is not
added at test time (the training model mixes it into each part; the test model does not).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from amg.errors import InputError
from amg.model.config import LA_PARTS


@functools.lru_cache(maxsize=None)
def part_pooling(num_patches: int, parts: int = LA_PARTS) -> torch.Tensor:
    """`[parts, num_patches]`: row i averages adaptive pooling's bin i, patches
    [floor(i L / parts), ceil((i + 1) L / parts)). One matmul with fixed shapes, so the feature
    exports (ONNX has no adaptive pooling whose bins do not divide the input evenly)."""
    weights = torch.zeros(parts, num_patches)
    for part in range(parts):
        start = part * num_patches // parts
        stop = -(-(part + 1) * num_patches // parts)
        weights[part, start:stop] = 1 / (stop - start)
    return weights


def la_part_features(tokens: torch.Tensor, num_patches: int) -> torch.Tensor:
    """`[B, parts x D]` from every token after the final norm, `[B, 1 + num_patches, D]`."""
    if tokens.shape[1] != 1 + num_patches:  # EViT / ToMe: fewer tokens, no longer one per patch
        raise InputError(f"LA-Transformer's part features pool the {num_patches} patch tokens by position, but the "
                         f"last block gives {tokens.shape[1] - 1}: not with a dynamic token policy (EViT, ToMe)")
    parts = part_pooling(num_patches).to(tokens) @ tokens[:, 1:]  # [B, parts, D]
    # each part to length 1 / sqrt(parts), as test.py's `query.div(norm(query) * sqrt(14))`
    return (F.normalize(parts, dim=-1) / math.sqrt(parts.shape[1])).flatten(1)
