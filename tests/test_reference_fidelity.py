"""The "amg" policy computes what the AMG reference code computes.

The reference's formulas are re-implemented here on an explicit attention forward of the
same weights (q, k, v from qkv, softmax(q k^T / sqrt(d)), autograd on the maps), without
amg's capture code or scorers, over several calibration batches with an uneven last one:
- heads: entropy (bits) over keys of the image-averaged map, mean over queries, x (1 + 0.02 l),
  one global ranking, highest removed first, which may remove every head of a block;
- tokens: per batch |mean over images, heads, queries of A * dL/dA|, summed over batches;
  each block L2-normalised over its patch positions, x (1 - 0.03 l), lowest dropped first;
- the reference's loader has no `drop_last`: its gradient hook adds every batch to the token
  scores, a smaller last one included (`seq_ranks += torch.abs(values)`), while its map sum
  adds only batches of the first batch's size (`if self.attn.shape[0] == attn.shape[0]`), so
  the head entropy leaves a smaller last batch out.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from amg.model.config import ModelConfig
from amg.model.vit import ReIDViT
from amg.pruning.calibration import CalibrationImages
from amg.pruning.planner import make_plan
from amg.pruning.scores import amg_head_removal_scores, amg_token_keep_scores, calibrate

CONFIG = ModelConfig("fidelity", img_size=(48, 32), patch_size=8, embed_dim=48, depth=3, num_heads=4)
BATCH = 8
IMAGES = 3 * BATCH + 5  # three full batches and an uneven last one: in the token scores, not in the maps


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ReIDViT(CONFIG, num_classes=5).eval()
    with torch.no_grad():  # a trained-looking neck: the loss goes through it
        model.neck.running_mean.normal_(0, 0.1)
    images = torch.randint(0, 256, (IMAGES, 3, *CONFIG.img_size), dtype=torch.uint8)
    labels = [i % 5 for i in range(IMAGES)]
    return model, images, labels


def explicit_forward(model: ReIDViT, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Class-token features and each block's attention map, computed step by step."""
    vit = model.backbone
    x = vit._pos_embed(vit.patch_embed(images))
    maps = []
    for block in vit.blocks:
        attn = block.attn
        y = block.norm1(x)
        batch, tokens, width = y.shape
        q, k, v = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)).softmax(dim=-1)
        maps.append(weights)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))
        x = x + block.mlp(block.norm2(x))
    return vit.norm(x)[:, 0], maps


def reference_scores(model: ReIDViT, images: torch.Tensor, labels: list[int], training_epoch: bool = False,
                     seed: int = 0, batch_size: int = BATCH, last_batch_tokens: bool = True):
    """(head removal scores, token keep scores) by the reference's formulas.

    `training_epoch`: calibrate as the reference does, in train mode (the BatchNorm neck on
    batch statistics), each image flipped with probability 1/2 (drawn from a generator seeded
    by `seed`, one draw per image in order), loss = cross-entropy + 0.2 KL(teacher || model),
    the teacher being the unpruned model in eval mode.
    `last_batch_tokens=False`: the rule this project followed before, a smaller last batch left
    out of the token scores too (to show that the difference shows).
    """
    teacher = copy.deepcopy(model).eval()
    model.train(training_epoch)
    flips = torch.Generator().manual_seed(seed)
    first_size = min(batch_size, len(images))
    averaged = 0
    map_sums = [0.0] * CONFIG.depth
    token_sums = [0.0] * CONFIG.depth
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float() / 255
        same_size = len(batch) == first_size  # the reference's `if self.attn.shape[0] == attn.shape[0]`
        if not (same_size or last_batch_tokens):
            continue
        batch = (batch - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        targets = torch.tensor(labels[start:start + batch_size])
        if training_epoch:
            flipped = torch.rand(len(batch), generator=flips) < 0.5
            batch = torch.stack([image.flip(-1) if f else image for image, f in zip(batch, flipped)])
        features, maps = explicit_forward(model, batch)
        logits = model.classifier(model.neck(features))
        loss = F.cross_entropy(logits, targets)
        if training_epoch:
            with torch.no_grad():
                soft = F.softmax(teacher.classifier(teacher.neck(explicit_forward(teacher, batch)[0])), dim=1)
            loss = loss + 0.2 * (soft * (soft.log() - F.log_softmax(logits, dim=1))).sum(dim=1).mean()
        grads = torch.autograd.grad(loss, maps)
        for block, (a, g) in enumerate(zip(maps, grads)):
            token_sums[block] = token_sums[block] + (a.detach() * g).mean(dim=(0, 1, 2)).abs()
            if same_size:
                map_sums[block] = map_sums[block] + a.detach().sum(dim=0)
        averaged += len(batch) if same_size else 0
    heads = []
    for block, total in enumerate(map_sums):
        p = total / averaged
        entropy = -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=-1).mean(dim=-1)
        heads.append(entropy * (1 + 0.02 * block))
    tokens = []
    for block, total in enumerate(token_sums):
        tokens.append(total / total[1:].norm() * (1 - 0.03 * block))
    return heads, tokens


def _reference_dropped_positions(token_scores, ratio: float) -> set[tuple[int, int]]:
    """(block, position) of the lowest-scoring patch positions of one global ranking."""
    ranked = sorted((float(s), b, p) for b, score in enumerate(token_scores) for p, s in enumerate(score) if p)
    return {(b, p) for _, b, p in ranked[:round(ratio * len(ranked))]}


def _dropped_positions(plan) -> set[tuple[int, int]]:
    """(block, position) of the K/V positions a plan does not keep."""
    return {(b, p) for b, kept in enumerate(plan.kept_tokens) for p in range(1, CONFIG.num_tokens)
            if kept is not None and p not in kept}


def test_token_and_head_scores_equal_the_reference_formulas(setup):
    model, images, labels = setup
    expected_heads, expected_tokens = reference_scores(copy.deepcopy(model), images, labels)
    stats = calibrate(copy.deepcopy(model), images, labels, batch_size=BATCH)
    assert stats.images == 3 * BATCH  # the maps leave the uneven last batch out
    assert stats.token_images == IMAGES  # the token scores add it
    heads = amg_head_removal_scores(model, stats, "global")
    tokens = amg_token_keep_scores(model, stats)
    for block in range(CONFIG.depth):
        assert torch.allclose(heads[block], expected_heads[block], rtol=1e-4, atol=1e-6), block
        assert torch.allclose(tokens[block][1:], expected_tokens[block][1:], rtol=1e-3, atol=1e-6), block


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_the_amg_plan_drops_the_positions_and_heads_the_reference_ranks_lowest(setup, ratio):
    model, images, labels = setup
    expected_heads, expected_tokens = reference_scores(copy.deepcopy(model), images, labels)
    data = CalibrationImages(images, labels, [0] * len(images), batch_size=BATCH)
    plan = make_plan(copy.deepcopy(model), tokens=ratio, data=data)
    assert _dropped_positions(plan) == _reference_dropped_positions(expected_tokens, ratio)
    head_plan = make_plan(copy.deepcopy(model), heads=ratio, data=data)
    removed = {(b, h) for b, kept in enumerate(head_plan.kept_heads) for h in range(CONFIG.num_heads) if h not in kept}
    assert removed == _reference_head_removal(expected_heads, round(ratio * CONFIG.depth * CONFIG.num_heads))


HUNDRED_BATCH = 32  # the reference's default batch: 100 images are 3 batches of 32 and a last one of 4


@pytest.fixture(scope="module")
def hundred_images(setup):
    model, _, _ = setup
    generator = torch.Generator().manual_seed(100)
    images = torch.randint(0, 256, (100, 3, *CONFIG.img_size), dtype=torch.uint8, generator=generator)
    labels = [i % 5 for i in range(100)]
    return model, images, labels


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_with_100_images_in_batches_of_32_the_last_4_count_in_the_token_scores(hundred_images, ratio):
    model, images, labels = hundred_images
    _, expected_tokens = reference_scores(copy.deepcopy(model), images, labels, batch_size=HUNDRED_BATCH)
    data = CalibrationImages(images, labels, [0] * len(images), batch_size=HUNDRED_BATCH)
    plan = make_plan(copy.deepcopy(model), tokens=ratio, data=data)
    expected = _reference_dropped_positions(expected_tokens, ratio)
    assert _dropped_positions(plan) == expected
    # the rule followed before (the last 4 left out) keeps other positions: the test can tell them apart
    _, without_last = reference_scores(copy.deepcopy(model), images, labels, batch_size=HUNDRED_BATCH,
                                       last_batch_tokens=False)
    assert _reference_dropped_positions(without_last, ratio) != expected


def test_a_last_batch_of_one_image_is_left_out_of_the_train_mode_calibration(setup):
    """Train-mode BatchNorm takes no statistics of one image (the reference's loader fails there)."""
    model, images, labels = setup
    count = 2 * BATCH + 1
    stats = calibrate(copy.deepcopy(model), images[:count], labels[:count], loss="reference", batch_size=BATCH)
    assert stats.images == stats.token_images == 2 * BATCH
    assert calibrate(copy.deepcopy(model), images[:count], labels[:count], batch_size=BATCH).token_images == count


def test_at_half_the_reference_empties_a_block_and_so_does_amg(setup):
    model, images, labels = setup
    expected_heads, _ = reference_scores(copy.deepcopy(model), images, labels)
    count = CONFIG.depth * CONFIG.num_heads // 2
    reference = _reference_head_removal(expected_heads, count)
    emptied = [b for b in range(CONFIG.depth) if sum(1 for block, _ in reference if block == b) == CONFIG.num_heads]
    assert emptied, "the fixture should make the reference empty a block at 50%"
    data = CalibrationImages(images, labels, [0] * len(images), batch_size=BATCH)
    plan = make_plan(copy.deepcopy(model), heads=0.5, tokens=0.25, data=data)
    assert [b for b, kept in enumerate(plan.kept_heads) if not kept] == emptied
    assert all(plan.kept_tokens[b] is None for b in emptied)  # no keys or values left to prune there
    # the named variant keeps a head in every block: the next-ranked heads elsewhere go instead
    capped = make_plan(copy.deepcopy(model), heads=0.5, allocation="keep-one", data=data)
    removed = {(b, h) for b, kept in enumerate(capped.kept_heads) for h in range(CONFIG.num_heads) if h not in kept}
    # (on the unpruned model every block has several heads, so both count l alike)
    assert removed == _reference_head_removal(expected_heads, count, keep_one=True)
    assert all(capped.kept_heads)


def _reference_head_removal(scores, count: int, keep_one: bool = False) -> set[tuple[int, int]]:
    """The `count` highest-scoring heads of one global ranking (optionally never a block's last head)."""
    removed: set[tuple[int, int]] = set()
    for _, block, head in sorted((-float(s), b, h) for b, score in enumerate(scores) for h, s in enumerate(score)):
        if len(removed) == count:
            break
        if keep_one and sum(1 for b, _ in removed if b == block) == CONFIG.num_heads - 1:
            continue
        removed.add((block, head))
    return removed


def test_the_whole_set_absolute_value_would_differ(setup):
    """Why the per-batch rule matters: |sum over all batches| ranks positions differently."""
    model, images, labels = setup
    _, expected_tokens = reference_scores(copy.deepcopy(model), images, labels)
    stats = calibrate(copy.deepcopy(model), images, labels, batch_size=IMAGES)  # one batch: |sum| of the set
    single = [t / t[1:].norm() * (1 - 0.03 * b) for b, t in enumerate(stats.token_taylor)]
    assert any(not torch.allclose(a[1:], b[1:], rtol=1e-3) for a, b in zip(single, expected_tokens))


def test_the_reference_training_epoch_calibration_is_reproduced_and_leaves_the_model_alone(setup):
    model, images, labels = setup
    expected_heads, expected_tokens = reference_scores(copy.deepcopy(model), images, labels, training_epoch=True,
                                                       seed=4)
    work = copy.deepcopy(model)
    before = {k: v.clone() for k, v in work.state_dict().items()}
    stats = calibrate(work, images, labels, loss="reference", batch_size=BATCH, seed=4)
    assert not work.training
    assert all(torch.equal(before[k], v) for k, v in work.state_dict().items())  # BatchNorm statistics put back
    heads = amg_head_removal_scores(work, stats, "global")
    tokens = amg_token_keep_scores(work, stats)
    for block in range(CONFIG.depth):
        assert torch.allclose(heads[block], expected_heads[block], rtol=1e-4, atol=1e-6), block
        assert torch.allclose(tokens[block][1:], expected_tokens[block][1:], rtol=1e-3, atol=1e-6), block
    # and it is a different calibration from the eval-mode ID loss
    _, eval_tokens = reference_scores(copy.deepcopy(model), images, labels)
    assert any(not torch.allclose(a[1:], b[1:], rtol=1e-3) for a, b in zip(tokens, eval_tokens))
