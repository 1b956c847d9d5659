"""Running an accuracy study: one task per configuration, in this process or on a Dask cluster.

A task plans, fine-tunes (when its schedule says so) and evaluates one configuration and writes
its row into the study folder; it needs only the folder and the data set, both on paths every
worker sees. Tasks are independent and deterministic (seeded, threads pinned), so the tables
are the same bytes whether one process or a cluster computed them, in any order. Dask
distributed reschedules the task of a worker that dies; a finished configuration is never
recomputed (unless its model file went missing or changed), so an interrupted study reruns
from where it stopped. One driver at a time: `amg study run` holds the folder (`hold_study`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from amg.benchmark.profiles import PruneSpec
from amg.benchmark.pruned_models import PrunedModels
from amg.benchmark.study_folder import StudyError, StudyFolder, model_file_hash
from amg.errors import InputError, Unplannable
from amg.train.cache import pruned_model_path

Progress = Callable[[str], None]
CLUSTER_INSTALL = "pip install 'amg-bench[cluster]'"
GPU = {"GPU": 1}  # a Dask resource: one task per GPU at a time


@dataclass(frozen=True)
class StudyTask:
    """One configuration of a study, as sent to a worker (plain strings: it travels by pickle)."""

    study: str
    config_id: str
    data_root: str
    threads: int
    device: str = "cpu"  # where it is fine-tuned and evaluated: "cpu" or "cuda" (the worker's GPU)


@dataclass
class StudyOutcome:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # finished by an earlier run
    skipped: dict[str, str] = field(default_factory=dict)  # config_id -> why it cannot be made
    failed: dict[str, str] = field(default_factory=dict)  # config_id -> the error
    seconds: float = 0.0


def run_task(task: StudyTask, progress: Progress | None = None) -> dict:
    """Make and evaluate `task`'s configuration, write its row; returns the row's summary."""
    import torch

    torch.set_num_threads(task.threads)
    torch.manual_seed(0)  # no task depends on what ran before it in the same process
    study = StudyFolder(task.study)
    spec = PruneSpec.from_config_id(task.config_id)
    if spec is None:
        raise InputError(f"{task.config_id!r} is not a configuration name (e.g. save0.2:heads:amg@ft300)")
    models = _pruned_models(task.study, task.data_root, task.device)
    models.progress = progress or _worker_progress(task.config_id)
    start = time.perf_counter()
    try:
        models.pruned(spec)
        result = models.accuracy(spec)
        record = {"accuracy": result.row, "queries": result.queries}
        if spec.schedule.kind != "one-shot":
            path = pruned_model_path(models.fine_tuning_key(spec), study.models)
            # the file's bytes, as evaluated: a device (and a rerun) uses it only while they match
            record.update(model=path.relative_to(study.folder).as_posix(), model_sha256=model_file_hash(path))
    except Unplannable as reason:  # out of reach on this model, a peer library missing: said, not hidden
        record = {"skipped": str(reason)}
    finally:
        models.release()
    record.update(seconds=round(time.perf_counter() - start, 1), threads=task.threads, device=task.device,
                  worker=f"{socket.gethostname()}:{os.getpid()}")
    study.save_row(task.config_id, record)
    return {"config_id": task.config_id, "seconds": record["seconds"], "skipped": record.get("skipped")}


@lru_cache(maxsize=1)
def _pruned_models(study_folder: str, data_root: str, device: str) -> PrunedModels:
    """The study's base model and data, loaded once per worker process (tasks share them)."""
    from amg.data.layout import load_dataset
    from amg.model.pruned import load_pruned

    study = StudyFolder.open(study_folder)
    dataset = load_dataset(data_root)
    expected = study.manifest()["data_identity"]
    if dataset.identity != expected:
        raise StudyError(f"the data set at {data_root} on {socket.gethostname()} is not the study's "
                         f"({dataset.identity} vs {expected}): every worker needs the same files")
    if device == "cuda":
        from amg.measure.backends import cuda_availability

        if reason := cuda_availability():
            raise InputError(f"--device cuda on {socket.gethostname()}: {reason}")
    return PrunedModels(load_pruned(study.base_path).to(device), dataset, print, plan_store=study.plans,
                        model_folder=study.models)


def _worker_progress(config_id: str) -> Progress:
    return lambda message: print(f"[amg study {config_id}] {message}", flush=True)


def start_study(folder: str | Path, model, dataset, configurations: Sequence[str]) -> StudyFolder:
    """The study of `model` on `dataset` in `folder`: new, or the one there continued
    (`StudyFolder.create`), with `model` saved as its base."""
    from amg.model.pruned import save_pruned
    from amg.train.cache import model_fingerprint

    return StudyFolder.create(folder, model_fingerprint(model), dataset.identity, dataset.name, configurations,
                              lambda path: save_pruned(model, path))


def run_study(study: StudyFolder, configurations: Sequence[str], data_root: str | Path, threads: int,
              workers: int = 0, address: str | None = None, progress: Progress = print,
              device: str = "cpu") -> StudyOutcome:
    """Compute every configuration not finished yet: here one after another (`workers` 0), on a
    local Dask cluster of `workers` processes, or on the running cluster at `address`; then
    write the study's tables. Tasks that fail are reported, the others kept. `device` "cuda":
    each task on its worker's GPU (on a cluster, one per worker started with `--resources GPU=1`)."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"a study runs on cpu or cuda, not {device!r}")
    outcome = StudyOutcome(reused=[c for c in configurations if _reusable(study, c, progress)])
    tasks = [StudyTask(str(study.folder.resolve()), config, str(Path(data_root).resolve()), threads, device)
             for config in configurations if config not in outcome.reused]
    progress(f"{len(configurations)} configurations: {len(outcome.reused)} already in {study.folder}, "
             f"{len(tasks)} to compute" + (f" on {address}" if address else
                                           f" on {workers} local Dask workers" if workers else " in this process"))
    start = time.perf_counter()
    try:
        engine = _run_on_dask if (workers or address) and tasks else _run_here  # (no cluster for nothing)
        for done, (config, summary, error) in enumerate(engine(tasks, workers, address), 1):
            if error is not None:
                outcome.failed[config] = error
            elif summary["skipped"]:
                outcome.skipped[config] = summary["skipped"]
            else:
                outcome.computed.append(config)
            state = f"failed: {error}" if error else "skipped" if config in outcome.skipped \
                else f"{summary['seconds']:.0f} s"
            progress(f"[{done}/{len(tasks)}] {config}: {state}")
    finally:  # interrupted too: the tables show what is finished
        outcome.seconds = time.perf_counter() - start
        study.write_tables()
    return outcome


def _reusable(study: StudyFolder, config_id: str, progress: Progress) -> bool:
    """Whether a finished configuration stands as it is. One whose model file was deleted or no longer
    hashes to what its row recorded is computed again, not reused: its row goes and a mismatched
    file is set aside (`StudyFolder.forget`), or the fine-tuning would be loaded from it again."""
    record = study.row(config_id)
    if record is None:
        return False
    if problem := study.model_problem(record):
        progress(f"{config_id}: {problem}: computed again")
        study.forget(record)
        return False
    return True


def _expected_work(task: StudyTask) -> int:
    """Fine-tuning steps, as a rank of how long a task takes (evaluation and planning: seconds)."""
    return PruneSpec.from_config_id(task.config_id).schedule.steps


def _run_here(tasks: Sequence[StudyTask], workers: int, address: str | None):
    for task in tasks:
        try:
            yield task.config_id, run_task(task, _worker_progress(task.config_id)), None
        except Exception as error:  # noqa: BLE001 - as on a cluster: reported, the others go on
            yield task.config_id, None, f"{type(error).__name__}: {error}"


def _run_on_dask(tasks: Sequence[StudyTask], workers: int, address: str | None):
    """One Dask task per configuration; a worker that dies has its task rescheduled elsewhere
    (up to the scheduler's `allowed-failures`), its finished rows stay on disk."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as error:
        raise InputError(f"running a study on workers needs Dask distributed: {CLUSTER_INSTALL}") from error
    gpu = bool(tasks) and tasks[0].device == "cuda"
    with contextlib.ExitStack() as stack:
        if address:
            client = stack.enter_context(Client(address))
        else:  # one single-threaded Dask worker per process: torch's threads are set per task
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, resources=GPU if gpu else None))
            client = stack.enter_context(Client(cluster))
        if gpu and not any(worker.get("resources", {}).get("GPU") for worker in
                           client.scheduler_info()["workers"].values()):
            raise InputError("no worker of this cluster offers a GPU: start one `dask worker ... --resources GPU=1` "
                             "per GPU (CUDA_VISIBLE_DEVICES set for each)")
        # The longest first (fine-tunings by their steps), so that no worker starts one at the end
        # alone; submitted in that order too, as workers take the first ones before priorities apply.
        ordered = sorted(tasks, key=_expected_work, reverse=True)
        futures = [client.submit(run_task, task, key=f"amg-study-{task.config_id}", pure=False,
                                 resources=GPU if gpu else None, priority=_expected_work(task)) for task in ordered]
        config_of = {future.key: task.config_id for future, task in zip(futures, ordered)}
        for future in as_completed(futures):
            try:
                yield config_of[future.key], future.result(), None
            except Exception as error:  # noqa: BLE001 - one configuration's failure is reported, the rest go on
                yield config_of[future.key], None, f"{type(error).__name__}: {error}"
