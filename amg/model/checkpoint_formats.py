"""The foreign checkpoint formats `amg import` reads, as data: key-renaming rules, what each
leaves untrained, and which retrieval feature each source evaluates with (torch-free: the
command line lists the formats)."""

from __future__ import annotations

Rule = tuple[str, str | None]  # (regex on the checkpoint key, replacement or None to drop)

FORMATS: dict[str, list[Rule]] = {
    # TransReID `build_transformer` / `build_transformer_local` (JPM) state dicts.
    "transreid": [
        (r"^base\.sie_embed$", "sie_embed"),
        (r"^base\.(fc|head)\.", None),  # ImageNet head, unused in Re-ID
        (r"^base\.(.*)$", r"backbone.\1"),
        (r"^bottleneck\.(.*)$", r"neck.\1"),
        (r"^classifier\.(.*)$", r"classifier.\1"),
        (r"^b2\.", None),  # JPM's local branch (b1, the global one, is mapped by `_jpm_global_branch`)
        (r"^(bottleneck|classifier)_\d+\.", None),  # JPM local necks and classifiers
    ],
    # A timm VisionTransformer state dict (e.g. ImageNet weights saved locally).
    "timm": [
        (r"^(head|fc_norm|head_drop)\.", None),
        (r"^(.*)$", r"backbone.\1"),
    ],
    # LA-Transformer (the AMG reference code's base): timm ViT as `model`, part classifiers.
    "la_transformer": [
        (r"^model\.(head|fc_norm)\.", None),
        (r"^model\.(.*)$", r"backbone.\1"),
        (r"^classifier\d+\.", None),
    ],
}
# Formats without a Re-ID neck leave it (and the training classifier) at their fresh init.
FRESH_OK = {"timm": ("neck.", "classifier."), "la_transformer": ("neck.", "classifier."),
            "transreid": ("classifier.",)}
# The retrieval feature each source evaluates with: TransReID's configs set TEST.NECK_FEAT
# 'before'; timm and LA-Transformer bring no trained BN neck, so only the class token means anything.
SOURCE_NECK_FEAT = {"transreid": "before", "timm": "before", "la_transformer": "before"}
