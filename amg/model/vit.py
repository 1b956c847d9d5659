"""ReIDViT: a timm VisionTransformer backbone with a Re-ID BNNeck, its presets, and saving/loading.

The forward pass is spelled out here (patch embed -> position (+camera) embedding -> blocks ->
final norm -> class token -> BatchNorm neck) rather than hidden in timm's `forward_features`,
because the camera embedding (SIE) has to be added between the position embedding and the blocks.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from amg.errors import InputError, Unplannable
from amg.files import write_atomic
from amg.model.attention import patch_model
from amg.model.config import DEFAULT_PRESET, LA_PARTS, LA_PARTS_FEATURE, NECK_FEATS, ModelConfig, get_config
from amg.model.la_parts import la_part_features

CHECKPOINT_FORMAT = "amg-reid-v1"


class OverlapPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with a convolution stride smaller than the patch (TransReID)."""

    def __init__(self, *args: Any, stride: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conv = self.proj
        self.proj = nn.Conv2d(
            conv.in_channels, conv.out_channels, kernel_size=self.patch_size,
            stride=stride, bias=conv.bias is not None,
        )
        self.grid_size = tuple((s - p) // stride + 1 for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Any:
        stride = self.proj.stride
        return max(stride) if as_scalar else stride


def build_backbone(config: ModelConfig) -> VisionTransformer:
    embed_layer: Any = PatchEmbed
    if config.patch_stride and config.patch_stride != config.patch_size:
        embed_layer = functools.partial(OverlapPatchEmbed, stride=config.patch_stride)
    backbone = VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        num_classes=0,
        global_pool="token",
        embed_layer=embed_layer,
    )
    # Fail early rather than mis-shape a position embedding later.
    assert backbone.patch_embed.num_patches + 1 == config.num_tokens
    return backbone


class ReIDViT(nn.Module):
    """ViT Re-ID model: class token after the final norm -> BatchNorm1d neck -> (training) classifier.

    In training mode `forward` returns `(logits, features)`: logits from the classifier after
    the neck (ID loss), features before the neck (triplet loss), as in BNNeck / TransReID.
    In eval mode it returns the retrieval feature: the neck output, the class token before
    the neck when `neck_feat` is "before", or LA-Transformer's part features when it is
    "la-parts" (saved with the model).
    """

    def __init__(self, config: ModelConfig, num_classes: int = 0) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone = build_backbone(config)
        dim = config.embed_dim
        self.sie_embed = (
            nn.Parameter(torch.zeros(config.num_cameras, 1, dim)) if config.num_cameras > 0 else None
        )
        if self.sie_embed is not None:
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        self.neck = nn.BatchNorm1d(dim)
        self.neck.bias.requires_grad_(False)  # BNNeck: a bias would shift the retrieval space
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes > 0 else None
        self.neck_feat = "after"
        # The last block only for the class token (`use_class_token_last_block`): the features
        # are the same; the last block's other rows, projections and MLP are skipped.
        self.class_token_only = False
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def feature_dim(self) -> int:
        return self.config.embed_dim * (LA_PARTS if self.neck_feat == LA_PARTS_FEATURE else 1)

    @property
    def reads_patch_tokens(self) -> bool:
        """Whether the retrieval feature reads the patch tokens after the last block (part-based
        features): then the last block cannot be computed for the class token alone. A subclass
        with a part-based head returns True."""
        return self.neck_feat == LA_PARTS_FEATURE

    def _embed(self, images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        """The tokens that enter the first block: patches, class token, positions (and cameras)."""
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed(images))
        if self.sie_embed is not None:
            if camids is None:
                raise InputError("this model has a camera embedding (SIE): pass camids to forward")
            if not _tracing():  # an export bakes no check in
                _check_cameras(camids, self.config.num_cameras)
            x = x + self.config.sie_scale * self.sie_embed[camids]
        return vit.norm_pre(vit.patch_drop(x))

    def forward_tokens(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, `[B, N, D]` (part-based heads use the patch tokens)."""
        vit = self.backbone
        return vit.norm(vit.blocks(self._embed(images, camids)))

    def use_class_token_last_block(self, on: bool = True) -> ReIDViT:
        """Compute the last block for the class token only in `forward` (lossless: a ReIDViT's
        features are its class token); `forward_tokens` still returns every token."""
        if on and self.reads_patch_tokens:  # Unplannable: the suite skips such a configuration, with why
            raise Unplannable(f"{type(self).__name__} reads patch tokens after the last block (a part-based "
                              "feature): its last block must stay whole for every token")
        if on:
            patch_model(self)
        self.class_token_only = on
        return self

    @property
    def class_token_block_active(self) -> bool:
        """Whether `forward` computes the last block for the class token only (it falls back to
        the whole block for EViT/ToMe blocks, while attention is being recorded, and for a
        feature that reads the patch tokens)."""
        return (self.class_token_only and not self.reads_patch_tokens
                and _class_token_block_applies(self.backbone.blocks[-1]))

    def forward_class_token(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """The class token after the final norm, `[B, D]`, with the last block computed for it alone:
        keys and values of every kept position, but one query, one attention row, one MLP row."""
        vit = self.backbone
        last = vit.blocks[-1]
        if not _class_token_block_applies(last):
            return self.forward_tokens(images, camids)[:, 0]
        x = vit.blocks[:-1](self._embed(images, camids))
        cls = x[:, :1] + last.drop_path1(last.ls1(last.attn.class_token_attention(last.norm1(x))))
        cls = cls + last.drop_path2(last.ls2(last.mlp(last.norm2(cls))))
        return vit.norm(cls)[:, 0]

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> Any:
        if not self.training and self.neck_feat == LA_PARTS_FEATURE:
            return la_part_features(self.forward_tokens(images, camids), self.backbone.patch_embed.num_patches)
        if self.class_token_only:
            features = self.forward_class_token(images, camids)
        else:
            features = self.forward_tokens(images, camids)[:, 0]
        if not self.training and self.neck_feat == "before":
            return features
        neck_features = self.neck(features)
        if not self.training:
            return neck_features
        if self.classifier is None:
            raise RuntimeError("training forward needs a classifier: build the model with num_classes > 0")
        return self.classifier(neck_features), features


def _class_token_block_applies(block: nn.Module) -> bool:
    """A plain (possibly pruned) block whose attention is not being recorded: EViT/ToMe blocks
    choose tokens from every row, and a recorder wants the whole attention map."""
    attn = block.attn
    return (hasattr(attn, "class_token_attention") and getattr(attn, "recorder", None) is None
            and getattr(block, "policy", None) is None)


def build_model(preset: str = DEFAULT_PRESET, num_classes: int = 0, **overrides: Any) -> ReIDViT:
    return ReIDViT(get_config(preset, **overrides), num_classes=num_classes)


def save_model(model: ReIDViT, path: str | Path, extra: dict[str, Any] | None = None,
               weights_dtype: torch.dtype | None = None, **meta: Any) -> Path:
    """Write config + weights (+ `extra` payload entries, + `meta`) so loading needs nothing else.

    `weights_dtype` (e.g. torch.float16) stores floating-point weights in that type: half the
    file for a committed model; `load_model` reads them back into float32 parameters.
    Atomic (temp file + rename): an interrupted save never leaves a truncated model file.
    """
    path = Path(path)
    state_dict = model.state_dict()
    if weights_dtype is not None:
        state_dict = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        meta = {**meta, "weights_dtype": str(weights_dtype).removeprefix("torch.")}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "num_classes": model.num_classes,
        "state_dict": state_dict,
        "neck_feat": model.neck_feat,
        "meta": meta,
        **(extra or {}),
    }
    return write_atomic(path, lambda stream: torch.save(payload, stream))


def read_checkpoint(path: str | Path, allowed_globals: Sequence[Any] = ()) -> dict[str, Any]:
    """The dict a `.pth` file holds, read by torch's weights-only unpickler (it runs no code).

    `allowed_globals`: more globals it may rebuild, as `torch.serialization.safe_globals` takes
    them (an object, or (object, its name in the file)); foreign files need some (numpy numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with _allowing(allowed_globals):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt file
        raise InputError(f"cannot read checkpoint {path}: {_unpickling_problem(path, error)}") from error
    if not isinstance(payload, dict):
        raise InputError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict")
    return payload


def _unpickling_problem(path: Path, error: Exception) -> str:
    """torch's error in one line: a refused global is named, without its page of advice; a file
    that is no PyTorch file at all (empty, a CSV) is said so, not with torch's internal message."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return (f"it holds a {refused.group(1)}, which weights-only loading refuses (only tensors, "
                "containers and plain numbers are read: nothing that could run code)")
    with open(path, "rb") as stream:
        start = stream.read(2)
    if not start:
        return "the file is empty"
    if start != b"PK" and start[:1] != b"\x80":  # torch.save writes a zip archive; older files a pickle
        return f"it is not a PyTorch file (torch.save writes a zip archive); torch said: {error or type(error).__name__}"
    return str(error) or f"{type(error).__name__} (a damaged or truncated file)"


def _allowing(allowed_globals: Sequence[Any]) -> contextlib.AbstractContextManager:
    # torch < 2.5 has no safe_globals: its unpickler then refuses them, and the error says which
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if not allowed_globals or safe_globals is None:
        return contextlib.nullcontext()
    return safe_globals(list(allowed_globals))


def load_model(path: str | Path,
               prepare: Callable[[ReIDViT, dict[str, Any]], None] | None = None) -> ReIDViT:
    """Load a model written by `save_model` (its config travels with it), in eval mode.

    `prepare(model, payload)` runs before the weights are loaded, to reshape the model
    (amg.model.pruned uses it to apply a saved plan).
    """
    payload = read_checkpoint(path)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"{path} is not an AMG-Bench checkpoint (format {payload.get('format')!r}); "
            "import foreign state dicts with `amg import` (amg.model.checkpoints.import_state_dict)"
        )
    config = ModelConfig.from_dict(payload["config"])
    num_classes = payload.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise InputError(f"{path}: num_classes must be a whole number >= 0, got {num_classes!r}")
    _refuse_models_beyond_memory(config, num_classes, path)
    model = ReIDViT(config, num_classes=num_classes)
    if prepare is not None:
        prepare(model, payload)
    elif payload.get("plan") is not None:
        raise InputError(f"{path} holds a pruned model: load it with amg.model.pruned.load_pruned")
    load_exact(model, payload["state_dict"], source=str(path))
    set_neck_feat(model, payload.get("neck_feat", "after"))
    return model.eval()


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()


def _check_cameras(camids: torch.Tensor, num_cameras: int) -> None:
    """Camera ids index the SIE table: one the model was not trained with has no embedding."""
    if not camids.numel():
        return
    low, high = (int(bound) for bound in torch.aminmax(camids))  # one pass on the forward's path
    if low < 0 or high >= num_cameras:
        raise InputError(f"camera id {high if high >= num_cameras else low} is outside this model's camera "
                         f"embedding (SIE) of {num_cameras} cameras (ids 0..{num_cameras - 1}): the data has "
                         "cameras the model was not trained with")


def _refuse_models_beyond_memory(config: ModelConfig, num_classes: int, source: str | Path) -> None:
    """A model file is small, but its config says how much to allocate: check before allocating,
    counting every tensor the config implies (blocks, embeddings, the camera table, the classifier)."""
    parameters = config.estimated_parameters + (config.num_cameras + num_classes) * config.embed_dim
    refuse_beyond_memory(parameters * 4 * 2,  # float32 weights, and the state dict read beside them
                         f"{source}: its config ({config.embed_dim} wide, {config.depth} blocks, "
                         f"{config.num_cameras} cameras, {num_classes} classes)")


def refuse_beyond_memory(needed: int, what: str, hint: str = "") -> None:
    """InputError when `what` needs more bytes than this machine has free: said before allocating,
    not as an out-of-memory kill after it."""
    import psutil

    available = psutil.virtual_memory().available
    if needed > available:
        raise InputError(f"{what} needs about {needed / 2**30:.1f} GiB, more than the "
                         f"{available / 2**30:.1f} GiB available{hint}")


def set_neck_feat(model: ReIDViT, neck_feat: str) -> ReIDViT:
    """Choose the eval-mode retrieval feature: "after" the BN neck, "before" it, or "la-parts"."""
    if neck_feat not in NECK_FEATS:
        raise InputError(f"unknown neck feature {neck_feat!r}; choose one of {', '.join(NECK_FEATS)}")
    model.neck_feat = neck_feat
    return model


def load_exact(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unknown and mis-shaped key in one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unknown = sorted(set(state_dict) - set(expected))
    not_tensors = sorted(key for key in set(state_dict) & set(expected) if not isinstance(state_dict[key], torch.Tensor))
    if not_tensors:
        raise InputError(f"checkpoint {source} does not fit the model: not tensors: {', '.join(not_tensors[:20])}")
    misshaped = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    # load_state_dict would cast integer values into float weights without a word: such a file is not weights
    miskinded = [f"{key}: checkpoint {state_dict[key].dtype} vs model {value.dtype}"
                 for key, value in expected.items()
                 if key in state_dict and value.is_floating_point() and not state_dict[key].is_floating_point()]
    if missing or unknown or misshaped or miskinded:
        lines = [f"checkpoint {source} does not fit the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unknown:
            lines.append(f"  unknown keys ({len(unknown)}): {', '.join(unknown[:20])}")
        if misshaped:
            lines.append(f"  shape mismatches ({len(misshaped)}): {'; '.join(misshaped[:10])}")
        if miskinded:
            lines.append(f"  integer values for float weights ({len(miskinded)}): {'; '.join(miskinded[:10])}")
        raise InputError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
