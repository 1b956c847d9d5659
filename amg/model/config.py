"""Model shapes: `ModelConfig` and the presets (torch-free: the command line lists presets,
plans check that they fit, without loading torch)."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from amg.errors import InputError


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a ReIDViT's shapes (weights come from a state dict)."""

    name: str
    img_size: tuple[int, int] = (256, 128)  # (height, width): pedestrians are tall
    patch_size: int = 16
    patch_stride: int | None = None  # < patch_size gives TransReID's overlapping patches
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_cameras: int = 0  # > 0 enables the side-information (camera) embedding, SIE
    sie_scale: float = 3.0  # TransReID's `sie_xishu`

    def __post_init__(self) -> None:
        # A config also comes from a model file: refuse shapes that cannot build, by name.
        problems = []
        counts = {"depth": self.depth, "num_heads": self.num_heads, "embed_dim": self.embed_dim,
                  "patch_size": self.patch_size, "num_cameras": self.num_cameras,
                  "patch_stride": 1 if self.patch_stride is None else self.patch_stride}
        not_whole = [name for name, value in counts.items() if not _is_whole(value)]
        sides = self.img_size if isinstance(self.img_size, (tuple, list)) else (self.img_size,)
        if not all(map(_is_whole, sides)):
            not_whole.append("img_size")
        if not_whole:  # a model file saying depth 6.5 would otherwise fail deep inside torch
            raise InputError(f"model config {self.name!r}: {', '.join(not_whole)} must be whole numbers, "
                             f"got {', '.join(f'{n}={getattr(self, n)!r}' for n in not_whole)}")
        if self.depth < 1 or self.num_heads < 1 or self.embed_dim < 1 or self.patch_size < 1:
            problems.append("depth, num_heads, embed_dim and patch_size must be >= 1")
        elif self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_stride is not None and self.patch_stride < 1:
            problems.append(f"patch_stride must be >= 1, got {self.patch_stride}")
        if len(self.img_size) != 2 or min(self.img_size) < max(self.patch_size, 1):
            problems.append(f"img_size {self.img_size} must be two sides of at least one patch ({self.patch_size})")
        if not self.mlp_ratio > 0 or self.num_cameras < 0:
            problems.append("mlp_ratio must be > 0 and num_cameras >= 0")
        if problems:
            raise InputError(f"model config {self.name!r}: " + "; ".join(problems))

    @property
    def estimated_parameters(self) -> int:
        """About how many parameters the model has (blocks, patch embedding, position embedding)."""
        dim, hidden = self.embed_dim, self.mlp_hidden
        block = 4 * dim * dim + 2 * dim * hidden
        return self.depth * block + 3 * self.patch_size ** 2 * dim + self.num_tokens * dim

    @property
    def grid_size(self) -> tuple[int, int]:
        stride = self.patch_stride or self.patch_size
        return tuple((s - self.patch_size) // stride + 1 for s in self.img_size)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid_size
        return rows * cols + 1

    @property
    def mlp_hidden(self) -> int:
        """Hidden channels of each block's MLP (timm's int(embed_dim * mlp_ratio))."""
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        values = dict(values)
        values["img_size"] = tuple(values.get("img_size", (256, 128)))
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # The embedded default: trains from scratch on the synthetic set in a few CPU minutes.
    "small": ModelConfig("small", img_size=(128, 64), embed_dim=192, depth=6, num_heads=6),
    "vit_tiny": ModelConfig("vit_tiny", embed_dim=192, depth=12, num_heads=3),
    "vit_small": ModelConfig("vit_small", embed_dim=384, depth=12, num_heads=6),
    "vit_base": ModelConfig("vit_base", embed_dim=768, depth=12, num_heads=12),
    # TransReID's ViT-Base: 16x16 patches at stride 12 (211 tokens at 256x128) and camera embedding.
    "transreid_base": ModelConfig(
        "transreid_base", embed_dim=768, depth=12, num_heads=12, patch_stride=12, num_cameras=6
    ),
}
DEFAULT_PRESET = "small"
# The retrieval feature in eval mode: the class token "after" the BN neck (BNNeck's default)
# or "before" it (TransReID's TEST.NECK_FEAT 'before'; the only sensible one when the neck
# was never trained, as for an imported backbone), or LA-Transformer's own test feature, its
# patch tokens pooled into parts (`amg.model.la_parts`; for models imported from it).
LA_PARTS_FEATURE = "la-parts"
NECK_FEATS = ("after", "before", LA_PARTS_FEATURE)
LA_PARTS = 14  # LA-Transformer's part count ("we cut the pool5 to sqrt(N) parts": N = 196 patches at 224x224)


def describe_feature(neck_feat: str) -> str:
    """The retrieval feature in words (messages, export manifests)."""
    if neck_feat == LA_PARTS_FEATURE:
        return (f"LA-Transformer's part features (the patch tokens average-pooled into {LA_PARTS} parts, "
                "each L2-normalised, concatenated)")
    return f"the class token {neck_feat} the BN neck"


def get_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset's config with `overrides` applied (e.g. `img_size=(256, 128)`, `num_cameras=8`)."""
    if preset not in PRESETS:
        raise InputError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)
