"""The prunable attention module, patched over timm's in place (as ToMe patches timm).

`PrunableAttention` keeps timm's parameter names (`qkv`, `proj`) so state dicts stay
timm-shaped, and adds two pruning states:

* kept heads: `qkv` and `proj` are physically smaller; `head_ids` remembers which of the
  original heads remain, so a plan always speaks of original head numbers;
* a static key/value index (`kv_index`): K and V are computed only for the kept token
  positions (the input is sliced before the k/v projection); queries are all kept, so the
  block still outputs every token;
* no head at all (the reference may empty a block): `qkv` has no rows and is never run,
  and the branch outputs the output projection's bias, exactly what the masked model's
  zeroed heads give; the block's compute is then its MLP (and the norm timm's block runs).

With nothing captured it runs fused `scaled_dot_product_attention`; inside
`capture_attention(...)` it runs the explicit softmax path and records the attention maps
(and, on request, their gradients) for scoring, leaving the model clean on exit.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn

from amg.errors import InputError


class PrunableAttention(nn.Module):
    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int,
                 block_index: int = 0) -> None:
        super().__init__()
        if qkv.out_features != 3 * num_heads * head_dim or proj.in_features != num_heads * head_dim:
            raise InputError(f"block {block_index}: qkv {tuple(qkv.weight.shape)} / proj {tuple(proj.weight.shape)} "
                             f"do not match {num_heads} heads of {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5  # pruning removes heads, never shrinks one: the scale stays
        self.block_index = block_index
        self.head_ids: tuple[int, ...] = tuple(range(num_heads))
        self.qkv, self.proj = qkv, proj
        # Not persistent: a pruned model's kept positions travel in its PrunePlan, not its weights.
        self.register_buffer("kv_index", None, persistent=False)
        self.recorder: _Recorder | None = None

    @classmethod
    def from_timm(cls, attn: TimmAttention, block_index: int) -> PrunableAttention:
        """Wrap a timm Attention, sharing (not copying) its projection weights."""
        unsupported = [name for name, present in (
            ("qk_norm", not isinstance(attn.q_norm, nn.Identity)),
            ("scale_norm", not isinstance(attn.norm, nn.Identity)),
            ("gated attention", getattr(attn, "gate", None) is not None),
            ("attention dropout", attn.attn_drop.p > 0),
        ) if present]
        if unsupported:
            raise NotImplementedError(f"block {block_index}: timm attention with {', '.join(unsupported)} "
                                      "is not supported by PrunableAttention")
        return cls(attn.qkv, attn.proj, attn.num_heads, attn.head_dim, block_index)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise InputError("PrunableAttention takes no attention mask: pruning is static (kv_index)")
        if self.num_heads == 0:
            return self.headless_output(x)
        q, k, v = self.project(x)
        if self.recorder is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = attn @ v
            self.recorder.record(self.block_index, attn, out)
        return self.merge_heads(out)

    def headless_output(self, x: torch.Tensor) -> torch.Tensor:
        """A block without heads: every token gets the projection's bias (zeros without one)."""
        bias = self.proj.bias
        if bias is None:
            return x.new_zeros(*x.shape[:-1], self.proj.out_features)
        return bias.expand(*x.shape[:-1], bias.shape[0])

    def forward_with_cues(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, keys `[B, heads, N_kv, d]`, class-token attention `[B, heads, N_kv]`).

        The cues dynamic token policies decide by (ToMe: keys; EViT: class attention); the
        class row is one extra query, far cheaper than the full explicit attention map.
        """
        q, k, v = self.project(x)
        out = F.scaled_dot_product_attention(q, k, v)
        cls_attention = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
        return self.merge_heads(out), k, cls_attention

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.inner_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q `[B, heads, N, d]`, and k, v at the kept positions `[B, heads, N_kv, d]`."""
        batch, tokens, _ = x.shape
        if self.kv_index is None:  # one fused matmul
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(
                2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        return self._queries(x), *self._keys_values(x)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        # Row slices of the fused weight are views: no copy, and the state dict keeps timm's names.
        weight, bias, inner = self.qkv.weight, self.qkv.bias, self.inner_dim
        q = F.linear(x, weight[:inner], None if bias is None else bias[:inner])
        return q.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias, inner = self.qkv.weight, self.qkv.bias, self.inner_dim
        kept = x if self.kv_index is None else x.index_select(1, self.kv_index)
        kv = F.linear(kept, weight[inner:], None if bias is None else bias[inner:])
        k, v = kv.reshape(x.shape[0], kept.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def class_token_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output of the class token alone, `[B, 1, D]`: its query against every
        kept key (a model whose features are the class token needs no other row)."""
        if self.num_heads == 0:
            return self.headless_output(x[:, :1])
        k, v = self._keys_values(x)
        return self.merge_heads(F.scaled_dot_product_attention(self._queries(x[:, :1]), k, v))

    def keep_heads(self, original_ids: Sequence[int]) -> None:
        """Physically keep only the heads with these original numbers (in their current order)."""
        missing = sorted(set(original_ids) - set(self.head_ids))
        if missing:
            raise InputError(f"block {self.block_index}: heads {missing} are not in this block "
                             f"(it has heads {list(self.head_ids)})")
        if not original_ids:  # the reference's emptied block: zero-row qkv (as its checkpoints), the bias stays
            nothing = torch.zeros(0, dtype=torch.long)
            self.qkv = slice_linear(self.qkv, rows=nothing)
            self.proj = slice_linear(self.proj, cols=nothing)
            self.head_ids, self.num_heads, self.kv_index = (), 0, None
            return
        positions = [self.head_ids.index(i) for i in sorted(set(original_ids))]
        dim, inner = self.head_dim, self.inner_dim
        rows = torch.tensor([part * inner + p * dim + j for part in range(3) for p in positions for j in range(dim)])
        cols = torch.tensor([p * dim + j for p in positions for j in range(dim)])
        self.qkv = slice_linear(self.qkv, rows=rows)
        self.proj = slice_linear(self.proj, cols=cols)
        self.head_ids = tuple(self.head_ids[p] for p in positions)
        self.num_heads = len(positions)

    def keep_tokens(self, positions: Sequence[int] | None, num_tokens: int) -> None:
        """Compute K and V only at these token positions (None: all of them)."""
        if positions is not None and self.num_heads == 0:
            raise InputError(f"block {self.block_index} has no head left, so no key/value positions to keep")
        if positions is None:
            self.kv_index = None
            return
        index = sorted(set(int(p) for p in positions))
        if not index or index[0] < 0 or index[-1] >= num_tokens:
            raise InputError(f"block {self.block_index}: key/value positions must lie in [0, {num_tokens}), "
                             f"got {index[:3]}...{index[-3:]}" if index else
                             f"block {self.block_index}: no key/value position kept")
        self.kv_index = torch.tensor(index, dtype=torch.long, device=self.qkv.weight.device)


def slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        bias = None if bias is None else bias[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    with warnings.catch_warnings():  # an emptied block's zero-size layers have nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def patch_model(model: nn.Module) -> list[PrunableAttention]:
    """Swap every timm Attention in `model.backbone.blocks` for a PrunableAttention (idempotent)."""
    modules = []
    for index, block in enumerate(model.backbone.blocks):
        if not isinstance(block.attn, PrunableAttention):
            if not isinstance(block.attn, TimmAttention):
                raise TypeError(f"block {index}: expected timm Attention, found {type(block.attn).__name__}")
            block.attn = PrunableAttention.from_timm(block.attn, index)
        modules.append(block.attn)
    return modules


@dataclass
class _Recorder:
    retain_grad: bool
    maps: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def record(self, block: int, attn: torch.Tensor, head_output: torch.Tensor) -> None:
        for tensor, store in ((attn, self.maps), (head_output, self.outputs)):
            if self.retain_grad and tensor.requires_grad:
                tensor.retain_grad()
            store.setdefault(block, []).append(tensor)


@dataclass
class AttentionCapture:
    """Per block and forward call: attention maps `[B, heads, N_q, N_kv]` and head outputs
    `[B, heads, N_q, head_dim]` (before the output projection)."""

    recorder: _Recorder

    def maps(self, block: int) -> list[torch.Tensor]:
        return self.recorder.maps.get(block, [])

    def head_outputs(self, block: int) -> list[torch.Tensor]:
        return self.recorder.outputs.get(block, [])

    @property
    def blocks(self) -> list[int]:
        return sorted(self.recorder.maps)



@contextlib.contextmanager
def capture_attention(model: nn.Module, retain_grad: bool = False) -> Iterator[AttentionCapture]:
    """Record every block's attention map during the `with` body; `retain_grad` keeps dL/dA too."""
    recorder = _Recorder(retain_grad)
    modules = patch_model(model)
    for module in modules:
        module.recorder = recorder
    try:
        yield AttentionCapture(recorder)
    finally:
        for module in modules:
            module.recorder = None
