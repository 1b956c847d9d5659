"""MLP channel pruning: which hidden channels of a block's MLP (fc1 rows, fc2 columns) stay.

Channels are numbered as in the unpruned block, like heads: a plan keeps original channel
numbers, and a block already pruned to a superset can be pruned further. The layers keep
timm's names (`mlp.fc1`, `mlp.fc2`), so state dicts stay readable by name.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from amg.errors import InputError
from amg.model.attention import slice_linear


def mlp_channel_ids(mlp: nn.Module) -> list[int]:
    """The original numbers of the hidden channels `mlp` still has."""
    return list(getattr(mlp, "channel_ids", range(mlp.fc1.out_features)))


def channel_ids_per_block(model: nn.Module) -> list[list[int]]:
    """`mlp_channel_ids` of every block of a ReIDViT."""
    return [mlp_channel_ids(layer.mlp) for layer in model.backbone.blocks]


def keep_mlp_channels(mlp: nn.Module, original_ids: Sequence[int], block: int) -> None:
    """Slice `mlp` (a timm Mlp: fc1, activation, fc2) to the hidden channels `original_ids`."""
    current = mlp_channel_ids(mlp)
    wanted = sorted(set(int(c) for c in original_ids))
    missing = sorted(set(wanted) - set(current))
    if not wanted or missing:
        raise InputError(f"block {block}: MLP channels {missing[:5] if missing else wanted} cannot be kept "
                         f"(the block has {len(current)} channels left; at least one must stay)")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise InputError(f"block {block}: an MLP with a norm between fc1 and fc2 cannot be sliced by channel here")
    if wanted == current:
        return
    positions = torch.tensor([current.index(c) for c in wanted], dtype=torch.long)
    mlp.fc1 = slice_linear(mlp.fc1, rows=positions)
    mlp.fc2 = slice_linear(mlp.fc2, cols=positions)
    mlp.channel_ids = wanted
