"""The accuracy study (`amg study run`): serial and on Dask workers, faults, resume, and devices that train nothing."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from amg.benchmark.profiles import PROFILES, Case, PruneSpec
from amg.benchmark.pruned_models import PrunedModels
from amg.benchmark.study_folder import NotInStudy, StudyError, StudyFolder
from amg.benchmark.study_run import run_study, start_study
from amg.data.layout import load_dataset
from amg.errors import InputError
from amg.model.pruned import load_pruned, save_pruned
from amg.train.cache import model_fingerprint

# one-shot AMG and random heads, tokens out of reach (skipped with its reason), and two fine-tunings
CONFIGS = ["unpruned", "save0.2:heads:amg", "save0.2:heads:random", "save0.2:tokens:amg",
           "save0.2:heads:amg@ft20", "save0.2:heads:random@ft20"]
LONG_FINE_TUNING = "save0.2:heads:amg@ft250"  # long enough to kill its worker in the middle

DASK_MISSING = "the study's cluster engine is not installed: pip install 'amg-bench[cluster]'"


def _new_study(folder, dataset, model, configs=CONFIGS) -> StudyFolder:
    return start_study(folder, model, dataset, configs)


def _run(folder, dataset, model, configs=CONFIGS, **engine):
    study = _new_study(folder, dataset, model, configs)
    return study, run_study(study, configs, dataset.root, threads=1, progress=lambda message: None, **engine)


@pytest.fixture(scope="module")
def serial_study(tiny_trained, tmp_path_factory):
    dataset, model = tiny_trained
    study, outcome = _run(tmp_path_factory.mktemp("serial") / "study", dataset, model, CONFIGS + [LONG_FINE_TUNING])
    assert not outcome.failed
    return study


def _files(study: StudyFolder, name: str) -> bytes:
    return (study.folder / name).read_bytes()


def test_serial_study_writes_accuracy_plans_and_fine_tuned_models(serial_study):
    table = _files(serial_study, "accuracy.csv").decode().splitlines()
    assert table[0].startswith("config_id,dataset,accuracy_of,query_rank1")
    assert [line.split(",")[0] for line in table[1:]] == [c for c in CONFIGS + [LONG_FINE_TUNING]
                                                          if c != "save0.2:tokens:amg"]
    assert "out of reach by tokens" in serial_study.row("save0.2:tokens:amg")["skipped"]
    with pytest.raises(NotInStudy, match="out of reach"):
        serial_study.check_member("save0.2:tokens:amg")
    assert serial_study.plans.path("save0.2:heads:amg").is_file()
    tuned = load_pruned(serial_study.model_path("save0.2:heads:amg@ft20"))
    one_shot = serial_study.plans.load("save0.2:heads:amg", tuned.config, serial_study.manifest()["base_fingerprint"])
    assert tuned.plan.kept_heads == one_shot.kept_heads  # fine-tuned from that plan
    assert not list(serial_study.folder.rglob("*.tmp")) and not list(serial_study.folder.rglob("*.resume"))


def test_two_dask_workers_give_the_serial_tables_byte_for_byte(serial_study, tiny_trained, tmp_path):
    pytest.importorskip("distributed", reason=DASK_MISSING)
    dataset, model = tiny_trained
    study, outcome = _run(tmp_path / "study", dataset, model, workers=2)
    assert not outcome.failed and len(outcome.computed) == len(CONFIGS) - 1
    workers = {row.split(",")[2] for row in _files(study, "timings.csv").decode().splitlines()[1:]}
    assert len(workers) == 2, "both workers took configurations"
    serial_rows = _files(serial_study, "accuracy.csv").decode().splitlines()
    assert _files(study, "accuracy.csv").decode().splitlines() == [
        row for row in serial_rows if not row.startswith(LONG_FINE_TUNING)]
    for config in ("save0.2:heads:amg@ft20", "save0.2:heads:random@ft20"):  # the same name: the same content
        assert study.model_path(config).name == serial_study.model_path(config).name


def test_a_killed_worker_costs_its_task_a_retry_not_the_study(serial_study, tiny_trained, tmp_path):
    pytest.importorskip("distributed", reason=DASK_MISSING)
    from distributed import Client, LocalCluster

    dataset, model = tiny_trained
    configs = ["unpruned", "save0.2:heads:amg", LONG_FINE_TUNING]
    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:

        def kill_the_fine_tuning_worker() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                for address, keys in client.processing().items():
                    if any(LONG_FINE_TUNING in str(key) for key in keys):
                        time.sleep(1.5)  # in the middle of its fine-tuning
                        pid = client.run(os.getpid, workers=[address])[address]
                        os.kill(pid, signal.SIGKILL)
                        killed["pid"] = pid
                        return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_the_fine_tuning_worker)
        killer.start()
        study, outcome = _run(tmp_path / "study", dataset, model, configs, address=cluster.scheduler_address)
        killer.join()
    assert killed, "the fine-tuning task was never seen running"
    assert not outcome.failed and sorted(outcome.computed) == sorted(configs)
    assert study.row(LONG_FINE_TUNING)["worker"].split(":")[1] != str(killed["pid"])  # retried elsewhere
    assert study.accuracy(LONG_FINE_TUNING).row == serial_study.accuracy(LONG_FINE_TUNING).row
    assert not list(study.folder.rglob("*.tmp")), "nothing half-written"
    for path in study.models.glob("*.pt"):
        load_pruned(path)


def test_an_interrupted_study_resumes_without_recomputing(serial_study, tiny_trained, tmp_path):
    dataset, model = tiny_trained
    finished = []

    def interrupt_after_two(message: str) -> None:
        if message.startswith("["):
            finished.append(message)
            if len(finished) == 2:
                raise KeyboardInterrupt

    study = _new_study(tmp_path / "study", dataset, model)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, CONFIGS, dataset.root, threads=1, progress=interrupt_after_two)
    done = [config for config in CONFIGS if study.finished(config)]
    assert len(done) == 2 and (study.folder / "accuracy.csv").is_file()  # the tables show what was finished
    stamps = {config: study._row_path(config).stat().st_mtime_ns for config in done}
    again = run_study(_new_study(study.folder, dataset, model), CONFIGS, dataset.root, threads=1,
                      progress=lambda message: None)
    assert again.reused == done and set(again.computed) | set(again.skipped) == set(CONFIGS) - set(done)
    assert {config: study._row_path(config).stat().st_mtime_ns for config in done} == stamps
    serial_rows = _files(serial_study, "accuracy.csv").decode().splitlines()
    assert _files(study, "accuracy.csv").decode().splitlines() == [
        row for row in serial_rows if not row.startswith(LONG_FINE_TUNING)]


def test_a_device_with_the_study_plans_and_trains_nothing(serial_study, tiny_trained, monkeypatch):
    import amg.benchmark.pruned_models as pruned_models
    from amg.benchmark.suite import Suite

    def refuse(*args, **kwargs):
        raise AssertionError("a device measuring a study must not plan or train")

    for name in ("run_schedule", "cached_pruned", "make_plan", "plan_for_saving", "CalibrationImages"):
        monkeypatch.setattr(pruned_models, name, refuse)
    base = load_pruned(serial_study.base_path)
    suite = Suite(base, "study", PROFILES["quick"], None, threads=1, progress=lambda m: None, study=serial_study)
    for config in ("unpruned", "save0.2:heads:amg", "save0.2:heads:amg@ft20", LONG_FINE_TUNING):
        spec = PruneSpec.from_config_id(config)
        case = Case(spec, "cpu", 1)
        row = suite.measure(case, suite.runner(case), [0.002, 0.003])
        assert row["query_mAP"] == serial_study.accuracy(config).row["query_mAP"]
        assert suite.query_values[config] == serial_study.accuracy(config).queries
    with_block = Case(PruneSpec.from_config_id("save0.2:heads:amg+cls-block@ft20"), "cpu", 1)
    assert with_block.spec is not None and with_block.spec.class_token_block
    row = suite.measure(with_block, suite.runner(with_block), [0.002])
    assert row["last_block"] == "class-token"  # the block's accuracy is its pruning's
    assert row["occluded_mAP"] == serial_study.accuracy("save0.2:heads:amg@ft20").row["occluded_mAP"]
    with pytest.raises(NotInStudy, match="not in the study"):
        suite.pruned(PruneSpec(saving=0.2, by="heads", head_policy="magnitude"))


def test_a_study_refuses_other_weights_other_data_and_foreign_folders(serial_study, tiny_trained, tmp_path):
    dataset, model = tiny_trained
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(StudyError, match="other base weights"):
        PrunedModels(other, None, print, study=serial_study)
    with pytest.raises(StudyError, match="study of another base"):
        _new_study(serial_study.folder, dataset, other)
    with pytest.raises(StudyError, match="study of another data"):
        StudyFolder.create(serial_study.folder, model_fingerprint(model), "market1501-0000", "market1501", [],
                           lambda path: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="not empty"):
        _new_study(tmp_path / "busy", dataset, model)
    with pytest.raises(StudyError, match="holds no study"):
        StudyFolder.open(tmp_path)


def test_data_identity_follows_the_files_not_the_folder(tiny_trained, tmp_path):
    import shutil

    dataset, _ = tiny_trained
    moved = shutil.copytree(dataset.root, tmp_path / "elsewhere")
    assert load_dataset(moved).identity == dataset.identity
    query = next((moved / "query").iterdir())
    query.write_bytes(query.read_bytes() + b"\0")
    assert load_dataset(moved).identity != dataset.identity


def test_a_worker_with_other_data_is_refused(serial_study, tiny_trained, tmp_path):
    import shutil

    from amg.benchmark.study_run import StudyTask, _pruned_models, run_task

    dataset, _ = tiny_trained
    moved = shutil.copytree(dataset.root, tmp_path / "other")
    (moved / "query" / next((moved / "query").iterdir()).name).unlink()
    _pruned_models.cache_clear()
    with pytest.raises(StudyError, match="not the study's"):
        run_task(StudyTask(str(serial_study.folder), "unpruned", str(moved), 1))
    _pruned_models.cache_clear()


def test_study_command_line_refuses_bad_names_and_both_engines(tmp_path):
    from amg.cli import main

    assert main(["study", "run", "--study", str(tmp_path / "s"), "--configs", "heads:amg"]) == 2
    assert main(["study", "run", "--study", str(tmp_path / "s"), "--profile", "quick", "--workers", "2",
                 "--address", "tcp://127.0.0.1:1"]) == 2
    with pytest.raises(InputError, match="random weights"):
        from amg.benchmark.profiles import study_configurations

        study_configurations(PROFILES["deploy"])


def test_pytest_bench_on_a_study_measures_its_accuracy_and_trains_nothing(tiny_trained, tmp_path):
    import pandas

    dataset, model = tiny_trained
    study, _ = _run(tmp_path / "study", dataset, model, ["unpruned", "heads0.25:amg", "tokens0.25:amg"])
    empty_cache = tmp_path / "cache"  # where anything trained, generated or planned would land
    command = [sys.executable, "-m", "pytest", "bench/test_suite.py", "-q", "-p", "no:cacheprovider",
               "--amg-profile", "quick", "--amg-policies", "amg", "--amg-study", str(study.folder),
               "--amg-results-dir", str(tmp_path / "results"), "--amg-threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "AMG_CACHE_DIR": str(empty_cache)},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "skipped" in result.stdout  # heads + tokens is not in the study
    assert not empty_cache.exists()
    rows = pandas.read_csv(next((tmp_path / "results").glob("*/*.csv")))
    expected = pandas.read_csv(study.folder / "accuracy.csv").set_index("config_id")
    for _, row in rows.iterrows():
        pruning = row["config_id"].removesuffix("+cls-block").removesuffix("cls-block") or "unpruned"
        assert row["occluded_mAP"] == pytest.approx(expected.loc[pruning, "occluded_mAP"], abs=1e-9)  # CSV: 10 digits
    assert {"heads0.25:amg+cls-block", "tokens0.25:amg+cls-block", "unpruned"} <= set(rows["config_id"])


@pytest.mark.cuda
def test_a_study_on_the_gpu_fine_tunes_and_evaluates_there(serial_study, tiny_trained, tmp_path):
    if not torch.cuda.is_available():
        if os.environ.get("AMG_REQUIRE_CUDA") == "1":
            pytest.fail("AMG_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    dataset, model = tiny_trained
    configs = ["unpruned", "save0.2:heads:amg", "save0.2:heads:amg@ft20"]
    study = _new_study(tmp_path / "study", dataset, model, configs)
    outcome = run_study(study, configs, dataset.root, threads=1, progress=lambda message: None, device="cuda")
    assert not outcome.failed and study.row("save0.2:heads:amg@ft20")["device"] == "cuda"
    load_pruned(study.model_path("save0.2:heads:amg@ft20"))
    on_cpu = serial_study.accuracy("unpruned").row["query_mAP"]
    assert study.accuracy("unpruned").row["query_mAP"] == pytest.approx(on_cpu, abs=1e-3)


def test_a_stopped_study_command_keeps_what_its_workers_finished(tiny_trained, tmp_path):
    pytest.importorskip("distributed", reason=DASK_MISSING)
    dataset, model = tiny_trained
    checkpoint = save_pruned(model, tmp_path / "tiny.pt")
    finished_first = ["save0.2:heads:amg", "save0.2:heads:random"]
    command = [sys.executable, "-m", "amg.cli", "study", "run", "--study", str(tmp_path / "study"), "--checkpoint",
               str(checkpoint), "--data", str(dataset.root), "--workers", "2", "--configs"]
    process = subprocess.Popen(command + [",".join(finished_first + ["save0.2:heads:amg@ft5000"])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    study = StudyFolder(tmp_path / "study")
    deadline = time.time() + 120
    while time.time() < deadline and not all((study.folder / "rows").is_dir() and study.finished(config)
                                             for config in ["unpruned", *finished_first]):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # a scheduler's stop, in the middle of the fine-tuning
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr
    assert not study.finished("save0.2:heads:amg@ft5000")
    assert "save0.2:heads:amg," in (study.folder / "accuracy.csv").read_text()  # the tables show what finished
    rerun = subprocess.run(command + [",".join(finished_first)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "0 computed" in rerun.stdout and "3 reused" in rerun.stdout
