"""The study folder refuses what it cannot trust: damaged study.json and rows (every field), model
paths that leave the study, model files swapped or deleted since their row, a second driver."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from amg.benchmark.profiles import PruneSpec
from amg.benchmark.pruned_models import PrunedModels
from amg.benchmark.study_folder import DRIVER_LOCK, MANIFEST, REJECTED_SUFFIX, StudyError, StudyFolder, hold_study
from amg.benchmark.study_run import run_study, start_study
from amg.model.pruned import load_pruned

TUNED = "save0.2:heads:amg@ft20"
ONE_SHOT = "save0.2:heads:amg"
SKIPPED = "save0.2:tokens:amg"
MODEL_BYTES = b"a fine-tuned model"


# ---------------------------------------------------------------- a hand-made study (nothing trained)
def _row(**fields) -> dict:
    return {"seconds": 1.5, "threads": 1, "device": "cpu", "worker": "host:1", **fields}


def _measured(**fields) -> dict:
    accuracy = {"dataset": "synthetic", "accuracy_of": "pytorch fp32", "query_rank1": 0.5, "query_mAP": 0.25,
                "query_unmatched": 0}
    return _row(accuracy=accuracy, queries={"query": {"ap": [0.5, 0.0], "rank1": [1, 0]}}, **fields)


@pytest.fixture
def study(tmp_path) -> StudyFolder:
    """unpruned, a one-shot, a skipped and a fine-tuned configuration, finished, with a model file."""
    study = StudyFolder.create(tmp_path / "study", "0123456789abcdef", "synth-00", "synth",
                               ["unpruned", ONE_SHOT, SKIPPED, TUNED], lambda path: path.write_bytes(b"base"))
    model = study.models / "0a1b2c.pt"
    model.parent.mkdir()
    model.write_bytes(MODEL_BYTES)
    study.save_row("unpruned", _measured())
    study.save_row(ONE_SHOT, _measured())
    study.save_row(SKIPPED, _row(skipped="out of reach by tokens"))
    study.save_row(TUNED, _measured(model="models/0a1b2c.pt", model_sha256=hashlib.sha256(MODEL_BYTES).hexdigest()))
    return study


def _edit_json(path, change) -> None:
    payload = json.loads(path.read_text())
    payload = change(payload)
    path.write_text(json.dumps(payload))


def test_a_sound_hand_made_study_reads_and_tabulates(study):
    assert StudyFolder.open(study.folder).configurations == ["unpruned", ONE_SHOT, SKIPPED, TUNED]
    assert study.model_path(TUNED).read_bytes() == MODEL_BYTES
    assert study.accuracy(TUNED).row["query_mAP"] == 0.25
    study.write_tables()
    assert (study.folder / "accuracy.csv").read_text().count("\n") == 4  # header + 3 measured


# ---------------------------------------------------------------- study.json, field by field
MANIFEST_DAMAGE = {
    "configurations a string": (lambda m: {**m, "configurations": "unpruned"}, "'configurations'"),
    "configurations an object": (lambda m: {**m, "configurations": {"unpruned": 1}}, "'configurations'"),
    "a configuration not a name": (lambda m: {**m, "configurations": ["unpruned", "heads:amg"]}, "item 1"),
    "a configuration a number": (lambda m: {**m, "configurations": ["unpruned", 3]}, "item 1"),
    "a configuration twice": (lambda m: {**m, "configurations": ["unpruned", "unpruned"]}, "more than once"),
    "no base_fingerprint": (lambda m: {k: v for k, v in m.items() if k != "base_fingerprint"},
                            "'base_fingerprint' is missing"),
    "base_fingerprint a number": (lambda m: {**m, "base_fingerprint": 12}, "'base_fingerprint'"),
    "data_identity empty": (lambda m: {**m, "data_identity": ""}, "'data_identity'"),
    "no data_identity": (lambda m: {k: v for k, v in m.items() if k != "data_identity"}, "'data_identity'"),
    "data_name null": (lambda m: {**m, "data_name": None}, "'data_name'"),
    "no configurations": (lambda m: {k: v for k, v in m.items() if k != "configurations"}, "'configurations'"),
    "an unknown field": (lambda m: {**m, "configuratons": []}, "'configuratons'"),
    "a list": (lambda m: [m], "not a study manifest"),
    "another format": (lambda m: {**m, "format": "amg-study/0"}, "not a study manifest"),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE, ids=list(MANIFEST_DAMAGE))
def test_a_damaged_study_json_is_refused_naming_the_file_and_field(study, damage):
    change, field = MANIFEST_DAMAGE[damage]
    path = study.folder / MANIFEST
    _edit_json(path, change)
    damaged = path.read_bytes()
    for read in (lambda: StudyFolder.open(study.folder), lambda: study.configurations,
                 lambda: study.check_base("0123456789abcdef"), study.write_tables,
                 lambda: StudyFolder.create(study.folder, "0123456789abcdef", "synth-00", "synth", [TUNED],
                                            lambda path: None)):
        with pytest.raises(StudyError) as error:
            read()
        assert str(path) in str(error.value) and field in str(error.value)
    assert path.read_bytes() == damaged  # never written back split into one-letter configurations


def test_a_study_is_not_made_with_names_that_are_no_configurations(tmp_path):
    with pytest.raises(StudyError, match="not configuration names: 'u'"):
        StudyFolder.create(tmp_path / "s", "0123456789abcdef", "synth-00", "synth", list("unpruned"),
                           lambda path: None)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- rows, field by field
def _without(name):
    return lambda row: {k: v for k, v in row.items() if k != name}


def _with(**fields):
    return lambda row: {**row, **fields}


ROW_DAMAGE = {  # (configuration, change, what the message names)
    "a list": (TUNED, lambda row: [row], "not a study row"),
    "another configuration's": (TUNED, _with(config_id=ONE_SHOT), "'config_id' must be 'save0.2:heads:amg@ft20'"),
    "no config_id": (TUNED, _without("config_id"), "'config_id' must be"),
    "no accuracy": (ONE_SHOT, _without("accuracy"), "'accuracy' is missing"),
    "accuracy a list": (ONE_SHOT, _with(accuracy=[0.5]), "'accuracy' must be"),
    "accuracy a text metric": (ONE_SHOT, lambda row: {**row, "accuracy": {**row["accuracy"], "query_mAP": "high"}},
                               "'accuracy.query_mAP'"),
    "accuracy a config_id column": (ONE_SHOT, lambda row: {**row, "accuracy": {**row["accuracy"], "config_id": 1}},
                                    "'config_id' column"),
    "accuracy without its data set": (ONE_SHOT, lambda row: {**row, "accuracy": {"query_mAP": 0.1}},
                                      "'accuracy.dataset'"),
    "no queries": (ONE_SHOT, _without("queries"), "'queries' is missing"),
    "queries a list": (ONE_SHOT, _with(queries=[]), "'queries' must be"),
    "a query set a list": (ONE_SHOT, _with(queries={"query": [0.5]}), "'queries.query'"),
    "AP values not numbers": (ONE_SHOT, _with(queries={"query": {"ap": ["x"], "rank1": [1]}}), "'queries.query.ap'"),
    "Rank-1 hits not 0/1": (ONE_SHOT, _with(queries={"query": {"ap": [0.5], "rank1": [2]}}), "'queries.query.rank1'"),
    "lists of two lengths": (ONE_SHOT, _with(queries={"query": {"ap": [0.5], "rank1": [1, 0]}}), "1 AP values"),
    "no seconds": (ONE_SHOT, _without("seconds"), "'seconds' is missing"),
    "seconds negative": (ONE_SHOT, _with(seconds=-1), "'seconds'"),
    "threads a boolean": (ONE_SHOT, _with(threads=True), "'threads'"),
    "threads zero": (SKIPPED, _with(threads=0), "'threads'"),
    "another device": (ONE_SHOT, _with(device="tpu"), "'device'"),
    "worker null": (ONE_SHOT, _with(worker=None), "'worker'"),
    "an unknown field": (ONE_SHOT, _with(acuracy={}), "'acuracy'"),
    "a model on a one-shot row": (ONE_SHOT, _with(model="models/0a1b2c.pt"), "'model'"),
    "skipped empty": (SKIPPED, _with(skipped=""), "'skipped'"),
    "skipped with accuracy": (SKIPPED, lambda row: {**row, "accuracy": {}}, "'accuracy'"),
    "fine-tuned without its model": (TUNED, _without("model"), "'model' is missing"),
    "fine-tuned without its hash": (TUNED, _without("model_sha256"), "'model_sha256' is missing"),
    "a hash too short": (TUNED, _with(model_sha256="abc"), "'model_sha256'"),
    "a model path a number": (TUNED, _with(model=3), "'model'"),
}


@pytest.mark.parametrize("damage", ROW_DAMAGE, ids=list(ROW_DAMAGE))
def test_a_damaged_row_is_refused_naming_the_file_and_field(study, damage):
    config, change, field = ROW_DAMAGE[damage]
    path = study._row_path(config)
    _edit_json(path, change)
    for read in (lambda: study.row(config), lambda: study.check_member(config), study.write_tables):
        with pytest.raises(StudyError) as error:
            read()
        assert str(path) in str(error.value) and field in str(error.value), str(error.value)
        assert "delete it to compute the configuration again" in str(error.value)


@pytest.mark.parametrize("where", ["../outside.pt", "{outside}", "models/../base.pt", "models/sub/x.pt",
                                   "models/0a1b2c.txt", "models/link.pt"])
def test_a_row_cannot_send_a_device_outside_the_study(study, tmp_path, where):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(MODEL_BYTES)
    (study.models / "link.pt").symlink_to(outside)  # a link inside that leads out
    path = study._row_path(TUNED)
    _edit_json(path, _with(model=where.format(outside=outside)))
    with pytest.raises(StudyError, match="not a model file in the study's models/") as error:
        study.model_path(TUNED)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- model files swapped or deleted
def test_a_swapped_or_deleted_model_file_is_refused_naming_it(study):
    model = study.model_path(TUNED)
    model.write_bytes(b"another model")
    with pytest.raises(StudyError, match="is not the one .* was written with") as error:
        study.model_path(TUNED)
    assert str(model) in str(error.value)
    model.unlink()
    with pytest.raises(StudyError, match="is missing"):
        study.model_path(TUNED)


# ---------------------------------------------------------------- one driver at a time
def test_a_second_driver_is_refused_while_one_holds_the_study(study, tmp_path, capsys):
    from amg.cli import main

    with hold_study(study.folder):
        with pytest.raises(StudyError, match="another `amg study run` is driving the study") as error:
            with hold_study(study.folder):
                pass
        assert str(study.folder) in str(error.value)
        # the command line: refused at once (before loading a model), one line, exit 2
        assert main(["study", "run", "--study", str(study.folder), "--configs", ONE_SHOT,
                     "--checkpoint", str(tmp_path / "none.pt")]) == 2
        assert "another `amg study run` is driving the study" in capsys.readouterr().err
        # and a driver in another process
        other = subprocess.run([sys.executable, "-m", "amg.cli", "study", "run", "--study", str(study.folder),
                                "--configs", ONE_SHOT, "--checkpoint", str(tmp_path / "none.pt")],
                               capture_output=True, text=True, timeout=300)
        assert other.returncode == 2 and "another `amg study run` is driving" in other.stderr
        assert str(study.folder) in other.stderr
    with hold_study(study.folder):  # free again once the first is done
        pass


def test_the_lock_file_neither_makes_a_folder_non_empty_nor_lands_in_a_foreign_one(tmp_path):
    with hold_study(tmp_path / "new"):
        StudyFolder.create(tmp_path / "new", "0123456789abcdef", "synth-00", "synth", ["unpruned"],
                           lambda path: path.write_bytes(b"base"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="not empty"):
        with hold_study(tmp_path / "mine"):
            pass
    assert not (tmp_path / "mine" / DRIVER_LOCK).exists()


# ---------------------------------------------------------------- a real study rerun and measured
CONFIGS = ["unpruned", TUNED, "save0.2:heads:random@ft20"]


def test_a_rerun_recomputes_models_deleted_or_swapped_and_a_device_refuses_a_swap(tiny_trained, tmp_path):
    dataset, model = tiny_trained
    messages = []
    study = start_study(tmp_path / "study", model, dataset, CONFIGS)
    assert not run_study(study, CONFIGS, dataset.root, threads=1, progress=messages.append).failed
    amg_file, random_file = study.model_path(TUNED), study.model_path("save0.2:heads:random@ft20")
    amg_bytes = amg_file.read_bytes()

    # a device measuring the study: the fine-tuned model swapped for another is refused, not measured
    os.replace(random_file, amg_file)
    devices_view = PrunedModels(load_pruned(study.base_path), None, print, study=study)
    with pytest.raises(StudyError, match="not the one") as error:
        devices_view.pruned(PruneSpec.from_config_id(TUNED))
    assert str(amg_file) in str(error.value)

    # the rerun: one model swapped, the other now missing -> both computed again, none reused
    again = run_study(start_study(study.folder, model, dataset, CONFIGS), CONFIGS, dataset.root, threads=1,
                      progress=messages.append)
    assert again.reused == ["unpruned"] and sorted(again.computed) == sorted(CONFIGS[1:])
    assert any("is missing: computed again" in message for message in messages)
    assert any("not the one" in message and "computed again" in message for message in messages)
    assert (amg_file.parent / (amg_file.name + REJECTED_SUFFIX)).is_file()  # the swapped file, set aside
    assert amg_file.read_bytes() == amg_bytes  # fine-tuned anew (deterministic), not taken from the swap
    for config in CONFIGS[1:]:
        load_pruned(study.model_path(config))  # each verified against its row again
