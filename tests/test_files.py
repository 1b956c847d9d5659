"""Every file is written whole, to its own name, and never through a planted link."""

from __future__ import annotations

import subprocess
import sys

import pytest

from amg.errors import InputError
from amg.files import write_atomic
from amg.model.pruned import load_pruned, save_pruned
from amg.model.vit import build_model

WRITER = """
import sys, torch
from amg.model.vit import build_model
from amg.model.pruned import save_pruned
from amg.pruning.planner import make_plan
from amg.model.pruned import apply_plan
torch.manual_seed(int(sys.argv[2]))
model = build_model("small", img_size=(64, 32)).eval()
apply_plan(model, make_plan(model, heads=0.25 * int(sys.argv[2]), head_policy="random", seed=int(sys.argv[2])))
for _ in range(8):
    save_pruned(model, sys.argv[1])
"""


def test_two_writers_to_one_model_file_leave_one_whole_model_with_its_own_plan(tmp_path):
    out = tmp_path / "pruned.pt"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(seed)]) for seed in (1, 2)]
    assert all(writer.wait(timeout=300) == 0 for writer in writers)
    model = load_pruned(out)  # not a corrupt zip
    heads = model.plan.heads_kept
    assert heads in (27, 18)  # 25% or 50% of 36 heads removed: one writer's model, with its own plan
    assert sum(m.num_heads for m in (b.attn for b in model.backbone.blocks)) == heads
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.pt"]  # no temporary file left


def test_a_planted_link_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "model.pt"
    (tmp_path / "model.pt.tmp").symlink_to(victim)  # the fixed temporary name older versions used
    save_pruned(build_model("small"), out)
    assert victim.read_text() == "keep me" and not out.is_symlink()
    out.unlink()
    out.symlink_to(victim)  # a link at the target itself
    save_pruned(build_model("small"), out)
    assert victim.read_text() == "keep me" and not out.is_symlink() and load_pruned(out) is not None


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def fail(stream):
        stream.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    with pytest.raises(FileExistsError):
        write_atomic(path, lambda stream: stream.write(b"new"), replace=False)
    with pytest.raises(InputError, match="is a folder"):
        write_atomic(tmp_path, lambda stream: None)


def test_two_writers_of_one_pair_of_files_land_each_whole_pair_in_turn(tmp_path):
    """`amg prune --out m.pt --plan-out m.json` twice at once: the model and the plan on disk come
    from one run (without the lock: one's model, the other's plan)."""
    import threading
    import time

    from amg.files import write_text_atomic, writing_together

    model, plan = tmp_path / "m.pt", tmp_path / "m.json"
    started = threading.Barrier(2)

    def write_pair(name: str, start: float, between: float) -> None:
        started.wait()
        time.sleep(start)
        with writing_together(model):
            write_text_atomic(model, name)
            time.sleep(between)  # unlocked, "b" would write both files meanwhile and "a" its plan last
            write_text_atomic(plan, name)

    writers = [threading.Thread(target=write_pair, args=args) for args in (("a", 0.0, 0.3), ("b", 0.05, 0.01))]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert model.read_text() == plan.read_text() == "b"
