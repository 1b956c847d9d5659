"""`amg study run`: the accuracy study, once, on this machine or a Dask cluster (see amg.benchmark.study_run)."""

from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from amg.errors import InputError

EPILOG = """\
The study writes STUDY/accuracy.csv and, per configuration, its plan and fine-tuned model.
Devices then measure latency and memory without training anything:
  pytest bench/ --amg-profile PROFILE --amg-study STUDY
A rerun computes only what is not finished (an interrupted study resumes), and what
lost its model file or whose model file changed. One `amg study run` per STUDY at a time.
Cluster: start `dask scheduler` and one `dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1`
per node (STUDY and the data on paths every node sees), then pass --address tcp://HOST:8786."""


def add_study_parser(sub: argparse._SubParsersAction, positive_int, non_negative_int) -> None:
    from amg.benchmark.profiles import PROFILES

    study = sub.add_parser("study", help="the accuracy study: prune, fine-tune and evaluate every configuration "
                                         "once (locally or on a Dask cluster) for every device to measure")
    study_sub = study.add_subparsers(dest="study_command", required=True, metavar="SUBCOMMAND")
    run = study_sub.add_parser("run", help="compute the configurations a profile (or --configs) names",
                               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--study", required=True, metavar="DIR",
                     help="the study folder (new, or one this base model and data set began: it is continued)")
    which = run.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile", choices=sorted(PROFILES),
                       help="the configurations whose accuracy this `pytest bench/` profile reports")
    which.add_argument("--configs", metavar="ID[,ID...]",
                       help="configuration names as the CSV's config_id writes them, e.g. "
                            "save0.2:heads:amg,save0.2:heads:amg@ft300 (the unpruned model is always added)")
    run.add_argument("--checkpoint", default=None, help="base model file (default: the embedded default model)")
    run.add_argument("--data", default=None, help="data set root every worker can read (default: the synthetic set)")
    run.add_argument("--workers", type=non_negative_int, default=0,
                     help="local Dask worker processes (default 0: one configuration after another in this process)")
    run.add_argument("--address", default=None, metavar="tcp://HOST:8786",
                     help="run on the Dask cluster whose scheduler is at this address instead")
    run.add_argument("--threads", type=positive_int, default=1,
                     help="torch threads per configuration (default 1; the same value gives the same numbers "
                          "to the last digit on every machine of one CPU kind)")
    run.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where configurations are fine-tuned and evaluated (cuda: each task on its worker's GPU; "
                          "start cluster workers with --resources GPU=1); default cpu")
    run.set_defaults(func=cmd_study_run)


def _configurations(args: argparse.Namespace) -> list[str]:
    from amg.benchmark.profiles import PROFILES, UNPRUNED, PruneSpec, study_configurations

    if args.profile:
        return study_configurations(PROFILES[args.profile])
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if PruneSpec.from_config_id(name) is None]
    if unknown:
        raise InputError(f"not configuration names: {', '.join(unknown)} (e.g. save0.2:heads:amg@ft300)")
    return list(dict.fromkeys([UNPRUNED.config_id, *names]))


def _stop_on_sigterm() -> None:
    """A scheduler's stop (SIGTERM) ends the study like Ctrl-C: finished configurations are kept
    and the tables written; the workers of a local cluster are stopped."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def cmd_study_run(args: argparse.Namespace) -> int:
    from amg.benchmark.study_folder import hold_study
    from amg.benchmark.study_run import run_study, start_study
    from amg.cli.commands import _load_dataset, _load_model_arg, progress

    _stop_on_sigterm()
    if args.workers and args.address:
        raise InputError("--workers starts a local cluster, --address joins a running one: give one")
    configurations = _configurations(args)
    # Held from the manifest's update to the tables: a second driver is refused before it loads anything.
    with hold_study(args.study):
        model = _load_model_arg(args.checkpoint)
        dataset = _load_dataset(args.data, "auto")
        study = start_study(args.study, model, dataset, configurations)
        outcome = run_study(study, configurations, dataset.root, args.threads, args.workers, args.address,
                            progress, args.device)
    rows = [(config, "computed" if config in outcome.computed else "already in the study" if config in outcome.reused
             else f"skipped: {outcome.skipped[config]}" if config in outcome.skipped
             else f"FAILED: {outcome.failed[config]}") for config in configurations]
    print(tabulate(rows, headers=["configuration", "state"]))
    print(f"{len(outcome.computed)} computed in {outcome.seconds:.0f} s, {len(outcome.reused)} reused, "
          f"{len(outcome.skipped)} skipped, {len(outcome.failed)} failed: {study.folder / 'accuracy.csv'}")
    if outcome.failed:
        print("amg study run: failed configurations are not in the tables; rerun to retry them", file=sys.stderr)
        return 1
    return 0
