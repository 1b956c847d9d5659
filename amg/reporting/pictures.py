"""What pruning removed, in pictures: head entropy by block and head, kept K/V positions over a person.

Drawn from the attention records the suite saves (`amg.benchmark.attention_record`) alone:
no model, no data set, no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from amg.benchmark.attention_record import SAMPLE_FILE, AttentionRecord, find_records, load_record
from amg.benchmark.results import ReportError
from amg.files import write_png_atomic
from amg.model.plan import PrunePlan

MAX_HEAD_PANELS = 3
TOKEN_BLOCKS = 4  # blocks shown with their kept K/V positions


# ------------------------------------------------------------------------------- drawing


def _plan_of(record: AttentionRecord, name: str, values: dict) -> PrunePlan:
    """A recorded plan, refused when it was made for another model than the record's."""
    plan = PrunePlan.from_dict(values)
    blocks, heads = len(record.entropy), len(record.entropy[0]) if record.entropy else 0
    if len(plan.kept_heads) != blocks or plan.num_heads != heads:
        raise ReportError(f"attention record of {record.key}: plan {name!r} is for {len(plan.kept_heads)} blocks x "
                          f"{plan.num_heads} heads, the record's model has {blocks} x {heads}")
    return plan


def _plans_by(record: AttentionRecord, part: str) -> list[tuple[str, PrunePlan]]:
    """AMG one-shot plans that prune `part`: heads fewest removed first; tokens see below."""
    plans = [(name, _plan_of(record, name, values)) for name, values in record.plans.items()
             if values.get("policy", {}).get(part) == "amg" and "@" not in name]
    if part == "heads":
        return sorted(plans, key=lambda item: (-item[1].heads_kept, item[0]))
    static = [(n, p) for n, p in plans if any(t is not None for t in p.kept_tokens)]
    # token-only plans first (their positions are not mixed with head removal), most pruned first
    return sorted(static, key=lambda item: (item[1].policy.get("heads", "none") != "none",
                                            sum(len(t) for t in item[1].kept_tokens if t is not None), item[0]))


def _head_panels(plans: list[tuple[str, PrunePlan]]) -> list[tuple[str, PrunePlan | None]]:
    """Up to MAX_HEAD_PANELS plans spread from least to most pruned, distinct by kept heads."""
    distinct: list[tuple[str, PrunePlan]] = []
    for name, plan in plans:
        if all(plan.kept_heads != other.kept_heads for _, other in distinct):
            distinct.append((name, plan))
    if len(distinct) > MAX_HEAD_PANELS:
        picks = np.linspace(0, len(distinct) - 1, MAX_HEAD_PANELS).round().astype(int)
        distinct = [distinct[i] for i in sorted(set(picks.tolist()))]
    return distinct or [("no AMG head plan recorded", None)]


def draw_entropy(record: AttentionRecord, path: Path) -> Path:
    """Heatmap of entropy (bits) by block and head; pruned heads crossed out, one panel per plan."""
    entropy = np.array(record.entropy)
    panels = _head_panels(_plans_by(record, "heads"))
    depth, heads = entropy.shape
    figure = Figure(figsize=(1.2 + 0.55 * heads * len(panels) + 1.0, 1.2 + 0.45 * depth), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, plan) in zip(axes, panels):
        image = ax.imshow(entropy, cmap="viridis", aspect="auto", vmin=entropy.min(), vmax=entropy.max())
        for block in range(depth):
            for head in range(heads):
                pruned = plan is not None and head not in plan.kept_heads[block]
                ax.text(head, block, "×" if pruned else f"{entropy[block, head]:.1f}", ha="center", va="center",
                        fontsize=11 if pruned else 7, color="red" if pruned else "white",
                        fontweight="bold" if pruned else "normal")
        removed = 0 if plan is None else depth * heads - plan.heads_kept
        ax.set_title(f"{name}\n{removed}/{depth * heads} heads removed (×)", fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(depth))
    figure.colorbar(image, ax=list(axes), label="attention entropy (bits), unpruned model")
    figure.suptitle(f"{record.model} ({Path(record.checkpoint).name}): head entropy; AMG removes high entropy",
                    fontsize=9)
    return write_png_atomic(figure, path)


def _token_blocks(depth: int) -> list[int]:
    return sorted(set(np.linspace(0, depth - 1, min(TOKEN_BLOCKS, depth)).round().astype(int).tolist()))


def draw_kept_positions(record: AttentionRecord, sample: np.ndarray, path: Path) -> Path:
    """The sample image per shown block, K/V positions dropped by the AMG token plan greyed out."""
    plans = _plans_by(record, "tokens")
    name, plan = plans[0] if plans else ("no AMG token plan recorded", None)
    depth = len(record.entropy)
    blocks = _token_blocks(depth)
    rows, cols = record.grid
    height, width = record.img_size
    figure = Figure(figsize=(1.6 * len(blocks) + 0.4, 3.6), layout="constrained")
    axes = figure.subplots(1, len(blocks), squeeze=False)[0]
    for ax, block in zip(axes, blocks):
        ax.imshow(sample)
        kept = None if plan is None else plan.kept_tokens[block]
        dropped = 0
        if kept is not None:
            kept_set = set(kept)
            for position in range(1, rows * cols + 1):  # position 0 is the class token, always kept
                if position not in kept_set:
                    row, col = divmod(position - 1, cols)
                    ax.add_patch(_patch_box(row, col, record.stride))
                    dropped += 1
        ax.set_title(f"block {block}\n{rows * cols - dropped}/{rows * cols} kept", fontsize=8)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(f"{record.model}: {name}\nkey/value positions each block keeps (grey: dropped)", fontsize=8)
    return write_png_atomic(figure, path)


def _patch_box(row: int, col: int, stride: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col * stride - 0.5, row * stride - 0.5), stride, stride, facecolor="black", alpha=0.65,
                     edgecolor="none")


def draw_records(results_dir: str | Path, out_dir: str | Path) -> list[tuple[AttentionRecord, list[Path]]]:
    """Both pictures for every recorded model: [(record, [entropy png, kept positions png])]."""
    drawn = []
    for folder in find_records(results_dir):
        record = load_record(folder)
        sample = np.asarray(Image.open(folder / SAMPLE_FILE).convert("RGB"))
        out = Path(out_dir)
        drawn.append((record, [draw_entropy(record, out / f"head_entropy_{record.key}.png"),
                               draw_kept_positions(record, sample, out / f"kept_kv_{record.key}.png")]))
    return drawn
