"""Options, profiles and the CSV report of the benchmark suite (`pytest bench/`).

A thin layer: cases come from `amg.benchmark.profiles`; pruning, runners and rows from `amg.benchmark.suite`;
the timing loop is pytest-benchmark's. At the end of the session the rows go to one CSV
per run under `<results-dir>/<device-id>/`, written atomically.
"""

from __future__ import annotations

import contextlib
import math
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from amg.benchmark.profiles import LAST_BLOCKS, PROFILES, build_cases
from amg.measure.backend_registry import BACKEND_NAMES, PRECISIONS
from amg.model.config import DEFAULT_PRESET, NECK_FEATS, PRESETS
from amg.pruning.policies import ALL_POLICY_NAMES

_SUITE_KEY = pytest.StashKey()
_JOURNAL_KEY = pytest.StashKey()  # the open, locked journal of this run
_SLOWDOWN_KEY = pytest.StashKey()  # --amg-inject-slowdown, checked once at start-up


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("amg", "AMG-Bench")
    add = group.addoption
    add("--amg-profile", default="default", choices=sorted(PROFILES),
        help="quick (<= 2 min on 2 CPU cores once cached), ci (what CI gates: quick at 25%% and 50%% on cpu "
             "and onnxruntime), default, full (every policy and ratio), "
             "equal-macs (every policy at 10/20/30/40%% MACs saved, one-shot, fine-tuned and iterative), "
             "int8 (pruning vs INT8 vs both on ONNX Runtime and OpenVINO), deploy (ViT-Small, ViT-Base, "
             "TransReID-Base at 256x128 with plans at 10/20/30%% of MACs, ~20 min), mlp (MLP channel "
             "pruning at 30/40/50%% of MACs against random and ToMe), mlp-long (its contenders fine-tuned 800 "
             "steps), or equal-macs-quick (a slice of equal-macs to try a study in minutes)")
    add("--amg-model", default=None, choices=sorted(PRESETS),
        help=f"model preset (default: {DEFAULT_PRESET}, or the deploy profile's vit_small, vit_base and "
             "transreid_base): the default one is trained on the synthetic set and cached; others are "
             "timed with random weights (no accuracy) unless --amg-checkpoint is given")
    add("--amg-checkpoint", default=None, help="an amg model file to benchmark instead of the preset")
    add("--amg-data", default=None, help="real data set root for calibration and accuracy (default: synthetic)")
    add("--amg-study", default=None, metavar="DIR",
        help="take pruned models and their accuracy from the study in DIR (`amg study run`): nothing is planned "
             "or trained here; its base model is measured, configurations it lacks skip; --amg-data adds the "
             "accuracy of reduced precisions")
    add("--amg-neck-feat", default=None, choices=NECK_FEATS,
        help="retrieval feature for accuracy: the class token after the BN neck or before it (TransReID's "
             "TEST.NECK_FEAT), or la-parts (LA-Transformer's 14 pooled part features; its configurations with "
             "a class-token last block skip); default: what the model file says (imports: their source's), "
             "else after")
    add("--amg-ratios", default=None, help="comma-separated pruning ratios, e.g. 0.25,0.5 (default: the profile's)")
    add("--amg-policies", default=None, help="comma-separated policies, e.g. amg,random,tome (default: the profile's)")
    add("--amg-backends", default=None,
        help=f"comma-separated backends from {','.join(BACKEND_NAMES)} (default: the profile's; unavailable ones skip)")
    add("--amg-batches", default=None, help="comma-separated batch sizes (default: the profile's)")
    add("--amg-precisions", default=None,
        help="comma-separated fp32,fp16,bf16,int8 for every backend (PyTorch: fp16/bf16 autocast; runtimes: "
             "their own; default: fp32, plus fp16 and bf16 on the GPU backends, plus the profile's)")
    add("--amg-last-block", default=None, choices=LAST_BLOCKS,
        help="class-token: every configuration computes its last block for the class token only (lossless; "
             "the unpruned full model is measured too, as the reference of every speed-up); full: the whole "
             "last block, as the model is defined; both (default: the profile's, class-token except the studies)")
    add("--amg-threads", type=int, default=None, help="torch / onnxruntime CPU threads (default: all cores)")
    add("--amg-plans", default=None, metavar="DIR",
        help="reuse the pruning plans stored in DIR (one <config_id>.json each) and store the ones this run "
             "makes there: runs on other CPUs or devices then measure the same pruned models (plans from "
             "gradients differ in near-ties between CPUs). CI measures the committed results/baselines/ci-plans")
    add("--amg-results-dir", default="results", help="where the CSV goes: <dir>/<device-id>/<run-id>.csv")
    add("--amg-no-report", action="store_true", help="do not write a CSV (e.g. while developing)")
    add("--amg-inject-slowdown", default=None, metavar="CONFIG=FACTOR[,...]",
        help="make configurations slower on purpose (e.g. heads0.25:amg=1.2) to check that the gate fails")


def _split(value: str | None, cast: Callable = str) -> list | None:
    if not value:
        return None
    try:
        return [cast(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError as error:
        raise pytest.UsageError(f"cannot parse {value!r}: {error}") from error


def _cases(config: pytest.Config):
    backends = _split(config.getoption("--amg-backends"))
    unknown = sorted(set(backends or ()) - set(BACKEND_NAMES))
    if unknown:
        raise pytest.UsageError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKEND_NAMES)}")
    precisions = _split(config.getoption("--amg-precisions"))
    if sorted(set(precisions or ()) - set(PRECISIONS)):
        raise pytest.UsageError(f"unknown precision(s) in {precisions}; choose from {', '.join(PRECISIONS)}")
    policies = _split(config.getoption("--amg-policies"))
    unknown = sorted(set(policies or ()) - set(ALL_POLICY_NAMES))
    if unknown:
        raise pytest.UsageError(f"unknown policy(ies) {unknown}; choose from {', '.join(ALL_POLICY_NAMES)}")
    ratios = _split(config.getoption("--amg-ratios"), float)
    for ratio in ratios or ():
        if not 0 < ratio < 1:
            raise pytest.UsageError(f"--amg-ratios: {ratio} is outside (0, 1)")
    batches = _split(config.getoption("--amg-batches"), int)
    if any(batch < 1 for batch in batches or ()):
        raise pytest.UsageError(f"--amg-batches: every batch size must be >= 1, got {batches}")
    try:
        # an explicit model (or a checkpoint) replaces the presets a multi-model profile spans
        model = "" if config.getoption("--amg-checkpoint") else config.getoption("--amg-model")
        return build_cases(PROFILES[config.getoption("--amg-profile")], ratios, policies, backends, batches,
                           precisions, None if model is None else [model], config.getoption("--amg-last-block"))
    except ValueError as error:
        raise pytest.UsageError(f"--amg-profile {config.getoption('--amg-profile')}: {error}") from error


def pytest_configure(config: pytest.Config) -> None:
    """Refuse what would only fail after everything was measured, or be ignored: a results
    folder that cannot take the CSV, a thread count below one, a slowdown for no case."""
    threads = config.getoption("--amg-threads", None)
    if threads is not None and threads < 1:
        raise pytest.UsageError(f"--amg-threads must be >= 1, got {threads}")
    config.stash[_SLOWDOWN_KEY] = _slowdown(config)
    if config.getoption("--amg-study", None):
        from amg.benchmark.study_folder import StudyError, StudyFolder

        if config.getoption("--amg-plans", None):
            raise pytest.UsageError("--amg-study brings the study's plans: --amg-plans does not apply")
        try:
            StudyFolder.open(config.getoption("--amg-study"))
        except StudyError as error:
            raise pytest.UsageError(f"--amg-study: {error}") from error
    if config.getoption("--amg-no-report", True):
        return
    folder = Path(config.getoption("--amg-results-dir"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise pytest.UsageError(f"--amg-results-dir {folder} cannot hold the report: {error}") from error
    from amg.benchmark.journals import recover_journals

    def warn(message: str) -> None:
        print(f"[amg] warning: {message}")

    for path in recover_journals(folder, warn):  # rows of runs that were killed before writing their CSV
        print(f"[amg] a killed run's measured rows recovered as an interrupted report: {path}")
    # SIGTERM (a scheduler's stop, `kill`) ends the run like Ctrl-C: what was measured is written.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)


# Set by Ctrl-C or SIGTERM. The KeyboardInterrupt raised then can land inside library code
# that turns it into another error (torch.save's zip writer does), which pytest would count
# as one failed test and go on: the flag stops the run at the next test and marks the report.
_INTERRUPTED = threading.Event()


def _interrupt(signum, frame) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt("interrupted earlier (the interrupt surfaced as another error)")


def _slowdown(config: pytest.Config) -> dict[str, float]:
    """--amg-inject-slowdown as {config id: factor}; an id no case of this run measures is an
    error (it would be ignored, and the check it was meant for would pass without testing)."""
    slowdown = {}
    if not config.getoption("--amg-inject-slowdown", None):
        return slowdown
    for item in _split(config.getoption("--amg-inject-slowdown")) or ():
        name, _, factor = item.rpartition("=")
        try:
            slowdown[name] = float(factor)
        except ValueError as error:
            raise pytest.UsageError(f"--amg-inject-slowdown: {item!r} is not CONFIG=FACTOR") from error
        if not math.isfinite(slowdown[name]) or slowdown[name] < 1:
            raise pytest.UsageError(f"--amg-inject-slowdown: {item!r}: the factor must be a finite number >= 1")
    measured = {case.spec.config_id for case in _cases(config)}
    unknown = sorted(set(slowdown) - measured)
    if unknown:
        raise pytest.UsageError(f"--amg-inject-slowdown: no case of this run measures {unknown}; "
                                f"its configurations are {', '.join(sorted(measured))}")
    return slowdown


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def progress_printer(config: pytest.Config) -> Callable[[str], None]:
    """Print past pytest's output capture: first-run data generation and training take minutes."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def progress(message: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n[amg] {message}", end="", flush=True)

    return progress


@pytest.fixture(scope="session")
def suite(request: pytest.FixtureRequest):
    from amg.benchmark.plan_store import PlanStore
    from amg.benchmark.journals import claim_journal, journal_path
    from amg.benchmark.study_folder import StudyError, StudyFolder
    from amg.benchmark.suite import Suite, untrained_model
    from amg.data.layout import load_dataset
    from amg.model.pruned import load_pruned
    from amg.model.vit import set_neck_feat
    from amg.train.cache import default_model, synthetic_root

    config = request.config
    progress = progress_printer(config)
    threads = config.getoption("--amg-threads")
    if threads:
        torch.set_num_threads(threads)
    profile = PROFILES[config.getoption("--amg-profile")]
    checkpoint = config.getoption("--amg-checkpoint")
    preset = config.getoption("--amg-model") or (profile.models[0] if profile.models and not checkpoint
                                                 else DEFAULT_PRESET)
    data_root = config.getoption("--amg-data")
    study = StudyFolder(config.getoption("--amg-study")) if config.getoption("--amg-study") else None
    if checkpoint:
        model, source = _or_exit("--amg-checkpoint", lambda: load_pruned(checkpoint)), checkpoint
    elif study:
        model, source = load_pruned(study.base_path), str(study.base_path)
    elif preset == DEFAULT_PRESET:
        model, source = default_model(preset, progress=progress)[0], "default"
    else:
        model, source = untrained_model(preset)
    if config.getoption("--amg-neck-feat"):
        set_neck_feat(model, config.getoption("--amg-neck-feat"))
    trained = bool(checkpoint) or preset == DEFAULT_PRESET
    dataset = None
    if data_root or (trained and not study):  # a study brings its accuracy: data only when asked for
        dataset = _or_exit("--amg-data", lambda: load_dataset(data_root or synthetic_root(progress=progress)))
    slowdown = config.stash[_SLOWDOWN_KEY]
    plans = config.getoption("--amg-plans")
    plan_store = _or_exit("--amg-plans", lambda: PlanStore(plans)) if plans else None
    try:
        state = Suite(model, source, profile, dataset,
                      torch.get_num_threads(), progress, slowdown=slowdown, plan_store=plan_store, study=study)
    except StudyError as error:
        pytest.exit(f"--amg-study: {error}", returncode=pytest.ExitCode.USAGE_ERROR)
    if not config.getoption("--amg-no-report"):
        state.journal = journal_path(config.getoption("--amg-results-dir"), state.metadata["device_id"],
                                     state.metadata["run_id"])
        config.stash[_JOURNAL_KEY] = claim_journal(state.journal)  # released when the process ends
    config.stash[_SUITE_KEY] = state
    return state


def _or_exit(option: str, load: Callable):
    """`load()`, or the whole run stopped with one line naming the option (a usage error, exit 4):
    a model file, data set or plan folder that cannot be used fails every case alike."""
    from amg.errors import InputError

    try:
        return load()
    except (InputError, OSError) as error:
        pytest.exit(f"{option}: {error}", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from amg.benchmark.query_record import save_query_record
    from amg.benchmark.journals import queries_journal
    from amg.benchmark.results import COMPLETE, INTERRUPTED, write_csv

    state = session.config.stash.get(_SUITE_KEY, None)
    if state is not None and state.journal is not None and not state.rows:
        state.journal.unlink(missing_ok=True)  # nothing measured: nothing to report or recover
        queries_journal(state.journal).unlink(missing_ok=True)
    if state is None or not state.rows or session.config.getoption("--amg-no-report"):
        return
    results_dir = Path(session.config.getoption("--amg-results-dir"))
    status = INTERRUPTED if exitstatus == pytest.ExitCode.INTERRUPTED or _INTERRUPTED.is_set() else COMPLETE
    rows = [{**row, "run_status": status} for row in state.rows]
    path = write_csv(rows, results_dir, state.metadata["device_id"], state.metadata["run_id"])
    if state.query_values:  # per-query accuracy for paired comparisons in `amg report`
        save_query_record(path, state.query_values)
    if state.journal is not None:
        state.journal.unlink(missing_ok=True)  # the report holds every row now
        queries_journal(state.journal).unlink(missing_ok=True)
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    say = reporter.write_line if reporter else print
    say(f"[amg] wrote {len(rows)} rows to {path}" + (" (interrupted run)" if status == INTERRUPTED else ""))
    try:
        record = state.save_attention_record(results_dir)
    except OSError as error:  # the report is written: a folder it cannot write ends the run with a word, not a traceback
        say(f"[amg] warning: could not save the attention record for `amg report`'s pictures: {error}")
        return
    if record:
        say(f"[amg] wrote head entropies and plans for `amg report`'s pictures to {record}")
