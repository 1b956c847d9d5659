"""fvcore operation counts on the real module graph, plus the analytic per-block formula.

fvcore counts one fused multiply-add as one flop, i.e. it reports MACs; every figure here
is in MACs and named so. fvcore skips `aten::scaled_dot_product_attention` (the fused
attention timm and PrunableAttention use), so a handle is registered for it:
`B * H * N_q * N_kv * (d_qk + d_v)` MACs, which equals fvcore's count of the explicit
`q @ k^T` and `attn @ v` matmuls.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan

with warnings.catch_warnings():  # fvcore's import calls torch.jit.script, which torch now deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis


def _shape(value: Any) -> list[int]:
    return value.type().sizes()


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> Counter:
    """fvcore handle for aten::scaled_dot_product_attention (inputs: q, k, v, ...)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    *batch, n_q, d_qk = q
    n_kv, d_v = k[-2], v[-1]
    batch_heads = 1
    for size in batch:
        batch_heads *= size
    return Counter({"scaled_dot_product_attention": batch_heads * n_q * n_kv * (d_qk + d_v)})


EXTRA_HANDLES = {"aten::scaled_dot_product_attention": sdpa_macs}


@dataclass(frozen=True)
class MacReport:
    total: int  # MACs for one forward pass at the given batch
    by_module: dict[str, int]
    params: int
    batch: int

    @property
    def gmacs_per_image(self) -> float:
        return self.total / self.batch / 1e9


def count_macs(model: nn.Module, batch: int = 1) -> MacReport:
    """Trace `model` (a ReIDViT, in eval mode) on a zero batch and count MACs with fvcore."""
    config = model.config
    images = torch.zeros(batch, 3, *config.img_size, device=next(model.parameters()).device)
    inputs: tuple[torch.Tensor, ...] = (images,)
    if getattr(model, "sie_embed", None) is not None:
        inputs = (images, torch.zeros(batch, dtype=torch.long, device=images.device))
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow
            total = int(analysis.total())
            by_module = {name: int(count) for name, count in analysis.by_module().items()}
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return MacReport(total, by_module, params, batch)


def analytic_block_macs(tokens: int, kv_tokens: int, dim: int, heads: int, head_dim: int,
                        mlp_hidden: int) -> dict[str, int]:
    """Per-image MACs of one pre-norm ViT block's matmuls (norms and activations excluded).

    q: N·D·hd, k and v: 2·M·D·hd (only kept positions), attention: 2·N·M·hd, proj: N·hd·D,
    MLP: 2·N·D·D_mlp, with N tokens, M kept key/value positions, hd = heads × head_dim.
    Unpruned (M = N, hd = D) this is the familiar 3ND² + 2N²D + ND² + 2N·D·D_mlp.
    """
    inner = heads * head_dim
    return {
        "qkv": tokens * dim * inner + 2 * kv_tokens * dim * inner,
        "attention": 2 * tokens * kv_tokens * inner,
        "proj": tokens * inner * dim,
        "mlp": 2 * tokens * dim * mlp_hidden,
    }


def analytic_model_macs(tokens: int, dim: int, head_dim: int, mlp_hidden: int | list[int],
                        heads_per_block: list[int], kv_per_block: list[int], patch_macs: int = 0) -> int:
    """Per-image MACs of all blocks' matmuls (+ `patch_macs` for the patch embedding);
    `mlp_hidden`: one width for every block, or one per block (MLP channel pruning)."""
    widths = mlp_hidden if isinstance(mlp_hidden, list) else [mlp_hidden] * len(heads_per_block)
    return patch_macs + sum(
        sum(analytic_block_macs(tokens, kv, dim, heads, head_dim, hidden).values())
        for heads, kv, hidden in zip(heads_per_block, kv_per_block, widths)
    )


def plan_macs(config: ModelConfig, plan: PrunePlan) -> int:
    """Analytic per-image MACs of the blocks under `plan` (instant; fvcore confirms a final plan)."""
    return analytic_model_macs(
        config.num_tokens, config.embed_dim, config.embed_dim // config.num_heads,
        plan.mlp_widths(config), [len(h) for h in plan.kept_heads],
        [config.num_tokens if t is None else len(t) for t in plan.kept_tokens],
    )
