"""Stored plans: round trip, refusals that name the file, and the suite measuring a stored plan."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from amg.benchmark.plan_store import PlanStore, PlanStoreError
from amg.benchmark.profiles import PROFILES, PruneSpec
from amg.benchmark.suite import Suite
from amg.model.plan import PrunePlan
from amg.model.pruned import current_plan
from amg.pruning.planner import make_plan
from amg.train.cache import model_fingerprint


@pytest.fixture(scope="module")
def model(tiny_trained):
    return tiny_trained[1]


@pytest.fixture(scope="module")
def random_plan(model):
    return make_plan(model, heads=0.34, head_policy="random", seed=3)


def test_a_stored_plan_reads_back_identical(tmp_path, model, random_plan):
    store = PlanStore(tmp_path / "plans")
    assert store.load("heads0.34:random", model.config, "abc") is None
    path = store.save("heads0.34:random", random_plan, "abc")
    assert path == tmp_path / "plans" / "heads0.34-random.json"
    assert store.load("heads0.34:random", model.config, "abc") == random_plan
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_a_plan_made_for_other_weights_is_refused(tmp_path, model, random_plan):
    store = PlanStore(tmp_path)
    store.save("heads0.34:random", random_plan, "abc")
    with pytest.raises(PlanStoreError, match=r"heads0\.34-random\.json was planned for other weights"):
        store.load("heads0.34:random", model.config, "def")


def test_a_renamed_plan_file_is_refused(tmp_path, model, random_plan):
    store = PlanStore(tmp_path)
    store.save("heads0.34:random", random_plan, "abc").rename(store.path("heads0.34:amg"))
    with pytest.raises(PlanStoreError, match="holds the plan of 'heads0.34:random', not of 'heads0.34:amg'"):
        store.load("heads0.34:amg", model.config, "abc")


def test_a_plan_for_another_architecture_is_refused(tmp_path, model, random_plan):
    store = PlanStore(tmp_path)
    store.save("heads0.34:random", random_plan, "abc")
    deeper = dataclasses.replace(model.config, depth=model.config.depth + 1)
    with pytest.raises(PlanStoreError, match="plan has 6 blocks, model has 7"):
        store.load("heads0.34:random", deeper, "abc")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "other"}), json.dumps([1, 2])])
def test_a_damaged_plan_file_is_refused_naming_it(tmp_path, model, content):
    store = PlanStore(tmp_path)
    store.path("heads0.34:random").write_text(content)
    with pytest.raises(PlanStoreError, match=r"cannot use stored plan .*heads0\.34-random\.json"):
        store.load("heads0.34:random", model.config, "abc")


@pytest.mark.parametrize("edit, message", [
    (lambda entry: entry["plan"]["kept_heads"][1].pop(), "edited after it was stored"),
    (lambda entry: entry.pop("plan_sha256"), "no content hash"),
])
def test_a_plan_edited_after_it_was_stored_is_refused(tmp_path, model, edit, message):
    store = PlanStore(tmp_path)
    plan = PrunePlan.unpruned(model.config)
    path = store.save("heads0.34:random", plan, "abc")
    entry = json.loads(path.read_text())
    edit(entry)
    path.write_text(json.dumps(entry))
    with pytest.raises(PlanStoreError, match=message):
        store.load("heads0.34:random", model.config, "abc")


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "plans").write_text("")
    with pytest.raises(PlanStoreError, match="exists and is not a folder"):
        PlanStore(tmp_path / "plans")


def test_the_suite_measures_the_stored_plan_instead_of_planning(tiny_trained, tmp_path):
    """A stored plan wins over what calibration would choose: the runs of every machine then
    prune alike. Here the stored plan for `heads0.5:amg` is a random one, which AMG would not pick."""
    dataset, model = tiny_trained
    spec = PruneSpec(heads=0.5)
    profile = dataclasses.replace(PROFILES["quick"], paired_rounds=3, rounds=3)
    stored = make_plan(model, heads=0.5, head_policy="random", seed=11)
    planned = make_plan(model, heads=0.5, head_policy="random", seed=12)
    assert stored.kept_heads != planned.kept_heads  # two different plans, or the test proves nothing
    store = PlanStore(tmp_path)
    store.save(spec.config_id, stored, model_fingerprint(model))
    suite = Suite(copy.deepcopy(model), "tiny", profile, dataset, threads=1, progress=lambda m: None,
                  plan_store=store)
    assert current_plan(suite.pruned(spec)).kept_heads == stored.kept_heads
    assert suite.models.calibrated is None  # nothing was scored

    fresh = Suite(copy.deepcopy(model), "tiny", profile, dataset, threads=1, progress=lambda m: None,
                  plan_store=PlanStore(tmp_path / "new"))
    made = fresh.models.plan(PruneSpec(heads=0.5, head_policy="random"))
    assert PlanStore(tmp_path / "new").load("heads0.5:random", model.config, model_fingerprint(model)) == made
