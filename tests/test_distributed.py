"""Data parallelism: two gloo processes on the CPU train as one process does on the same global batch."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

from amg.data.layout import relabel_pids
from amg.data.preload import preload_images
from amg.data.sampler import PKSampler, rank_share
from amg.errors import InputError
from amg.model.vit import ReIDViT, build_model, save_model
from amg.pruning.planner import make_plan
from amg.train import distributed, reid_training
from amg.train.config import TrainConfig

WORLD_SIZE = 2
CONFIG = TrainConfig(steps=200, num_identities=4, num_instances=2, warmup_steps=20, log_every=20)
COMPARED_BATCHES = 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _training_inputs(dataset) -> tuple[ReIDViT, torch.Tensor, list[int], list[int]]:
    labels, _ = relabel_pids(dataset.train)
    torch.manual_seed(0)
    model = build_model("small", num_classes=max(labels) + 1, img_size=(64, 32))
    return model, preload_images(dataset.train, (64, 32)), labels, [s.camid for s in dataset.train]


def _first_batches(model, images, labels, camids, share: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = reid_training._training_batches(model, images, labels, camids, CONFIG, torch.tensor(share))
    return [next(batches)[:2] for _ in range(COMPARED_BATCHES)]


def _first_gradients(model, images, labels, camids, share: list[int]) -> dict[str, torch.Tensor]:
    """The gradients of one step on the first batch, distilled from a copy of the model (Adam's
    steps hardly change with the gradients' scale: the loss curve alone would not show a wrong one)."""
    student, teacher = copy.deepcopy(model), copy.deepcopy(model).eval()
    with distributed.data_parallel(student, teacher) as trained:
        batch, batch_labels = _first_batches(student, images, labels, camids, share)[0]
        trained.train()
        loss, _ = reid_training._reid_loss(trained, batch, distributed.gather_rows(batch_labels), None, CONFIG,
                                           teacher)
        loss.backward()
    return {name: parameter.grad for name, parameter in student.named_parameters() if parameter.grad is not None}


def _worker(rank: int, dataset, port: int, out) -> None:
    """One of two torchrun-like processes: its batches, its first gradients, its P=3 refusal, then 200 steps."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1",
                      CUDA_VISIBLE_DEVICES="")  # gloo on the CPU, compared with the CPU's single process
    with distributed.session() as world:
        model, images, labels, camids = _training_inputs(dataset)
        share = rank_share(CONFIG.num_identities, CONFIG.num_instances, world.rank, world.size)
        batches = _first_batches(model, images, labels, camids, share)
        gradients = _first_gradients(model, images, labels, camids, share)
        # each process draws other heads (its own seed): all must prune to rank 0's plan
        plan = make_plan(model, heads=0.34, head_policy="random", seed=world.rank)
        try:
            reid_training.train_reid(model, images, labels, camids, dataclasses.replace(CONFIG, num_identities=3))
            refusal = None
        except InputError as error:
            refusal = str(error)
        log = reid_training.train_reid(model, images, labels, camids, CONFIG)
    torch.save({"share": share, "batches": batches, "gradients": gradients, "refusal": refusal, "losses": log.losses,
                "kept_heads": plan.kept_heads,
                "accuracy": log.final_accuracy, "returned": type(model).__name__, "weights": model.state_dict()},
               out / f"rank{rank}.pt")


def test_rank_shares_are_disjoint_pk_batches_that_make_up_the_batch():
    labels = [index // 3 for index in range(24)]  # 8 identities x 3 images
    sampler = PKSampler(labels, 4, 3, seed=2)
    batch = list(sampler)[:sampler.batch_size]
    for world_size in (1, 2, 4):
        positions = [rank_share(4, 3, rank, world_size) for rank in range(world_size)]
        assert sorted(sum(positions, [])) == list(range(12))  # disjoint, and together the batch
        for share in positions:
            per_identity = Counter(labels[batch[i]] for i in share)
            assert len(per_identity) == 4 // world_size and set(per_identity.values()) == {3}
    assert rank_share(4, 2, 1, 2) == [2, 3, 6, 7]  # identities 1 and 3, all instances


def test_a_p_that_the_processes_cannot_share_is_refused():
    with pytest.raises(InputError, match=r"P=3 identities cannot be split evenly over 2 processes"):
        rank_share(3, 4, 0, 2)


@pytest.mark.slow
def test_two_processes_train_as_one_on_the_same_global_batch(tiny_trained, tmp_path):
    dataset, _ = tiny_trained
    mp.spawn(_worker, args=(dataset, _free_port(), tmp_path), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]

    model, images, labels, camids = _training_inputs(dataset)
    everything = list(range(CONFIG.num_identities * CONFIG.num_instances))
    single_batches = _first_batches(model, images, labels, camids, everything)
    single_gradients = _first_gradients(model, images, labels, camids, everything)
    single = reid_training.train_reid(model, images, labels, camids, CONFIG)

    for rank in ranks:  # each process trains on its identities' rows of the single-process batch
        for (rank_images, rank_labels), (all_images, all_labels) in zip(rank["batches"], single_batches):
            assert torch.equal(rank_images, all_images[rank["share"]])
            assert torch.equal(rank_labels, all_labels[rank["share"]])
            assert set(Counter(rank_labels.tolist()).values()) == {CONFIG.num_instances}
        assert "P=3" in rank["refusal"] and f"{WORLD_SIZE} processes" in rank["refusal"]
        assert rank["gradients"].keys() == single_gradients.keys()
        for name, gradient in single_gradients.items():  # DDP's average is the global batch's gradient
            torch.testing.assert_close(rank["gradients"][name], gradient, rtol=1e-3, atol=1e-6, msg=name)
        assert rank["returned"] == "ReIDViT"  # the plain module, not the DDP wrapper
        assert (rank["losses"], rank["accuracy"]) == (ranks[0]["losses"], ranks[0]["accuracy"])  # the global ones
    assert all(torch.equal(value, ranks[1]["weights"][name]) for name, value in ranks[0]["weights"].items())
    rank0_plan = make_plan(model, heads=0.34, head_policy="random", seed=0).kept_heads
    assert make_plan(model, heads=0.34, head_policy="random", seed=1).kept_heads != rank0_plan  # the seeds differ
    assert ranks[0]["kept_heads"] == ranks[1]["kept_heads"] == rank0_plan
    assert len(ranks[0]["losses"]) == len(single.losses) == CONFIG.steps // CONFIG.log_every
    assert single.losses[-1] < 0.5 * single.losses[0]  # it learned: the comparison is not of two flat lines
    assert ranks[0]["losses"][-1] == pytest.approx(single.losses[-1], rel=0.02)


@pytest.mark.slow
def test_prune_with_fine_tuning_under_torchrun_writes_one_model(tiny_trained, tmp_path):
    from amg.model.pruned import load_pruned

    dataset, model = tiny_trained
    model_path = save_model(model, tmp_path / "tiny.pt")
    out = tmp_path / "pruned.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "amg.cli",
               "prune", "--model", str(model_path), "--data", str(dataset.root), "--heads", "0.34",
               "--finetune", "3", "--calibration-images", "6", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out)]  # rank 0 alone writes and prints
    assert result.stderr.count("step 3/3") == 1 and "data parallel over 2 processes (gloo)" in result.stderr
    pruned = load_pruned(out)
    assert pruned.plan.policy["schedule"] == "one-shot + 3 fine-tune steps, distilled"
    assert not torch.equal(pruned.classifier.weight, model.classifier.weight)  # fine-tuned


@pytest.mark.slow
def test_bad_input_under_torchrun_is_said_once(tiny_trained, tmp_path):
    dataset, _ = tiny_trained
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "amg.cli",
               "prune", "--model", str(tmp_path / "missing.pt"), "--data", str(dataset.root), "--heads", "0.34",
               "--finetune", "3", "--out", str(tmp_path / "pruned.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert result.stderr.count("amg prune: error:") == 1 and "missing.pt" in result.stderr
