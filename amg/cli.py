"""The `amg` command: data, train, eval, prune, flops, report, select, gate, import.

Every subcommand prints progress to stderr and results to stdout, so results can be piped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from tabulate import tabulate

from amg.data.synthetic import SynthConfig
from amg.errors import InputError
from amg.measure.backend_registry import BACKEND_NAMES, PRECISIONS
from amg.pruning.policies import ALL_POLICY_NAMES, HEAD_ALLOCATIONS, HEAD_POLICIES, TOKEN_POLICIES, Policy
from amg.train.config import TrainConfig

EXIT_USAGE = 2
WEIGHTS_DTYPES = ("fp32", "fp16")


def _policy_help(policies: dict[str, Policy]) -> str:
    return "; ".join(f"{name} ({p.summary})" for name, p in policies.items())


def progress(message: str) -> None:
    print(f"[amg] {message}", file=sys.stderr, flush=True)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from amg.data.synthetic import generate

    config = SynthConfig(train_ids=args.ids, test_ids=args.test_ids or args.ids,
                         images_per_id=args.images_per_id, num_cameras=args.cameras, seed=args.seed)
    manifest = generate(args.out, config, progress)
    print(json.dumps(manifest, indent=2))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from amg.data.layout import load_dataset

    print(load_dataset(args.root, args.layout).summary())
    return 0


def _load_dataset(root: str | None, layout: str):
    from amg.data.layout import load_dataset
    from amg.train.cache import synthetic_root

    return load_dataset(root if root else synthetic_root(progress=progress), layout if root else "auto")


def _training_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed, num_identities=args.batch_ids,
                       num_instances=args.batch_instances)


def cmd_train(args: argparse.Namespace) -> int:
    from amg.model.vit import read_checkpoint, save_model
    from amg.train.cache import default_model, train_on_dataset

    _set_threads(args.threads)
    training = _training_config(args)
    import torch

    weights_dtype = torch.float16 if args.weights_dtype == "fp16" else None
    if args.data is None and not (args.img_size or args.sie):  # the embedded default: cached, copied if asked
        model, path = default_model(args.preset, training=training, progress=progress)
        print(save_model(model, args.out, weights_dtype=weights_dtype, **read_checkpoint(path).get("meta", {}))
              if args.out else path)
        return 0
    if args.out is None:
        raise InputError("--out is required when training on --data")
    dataset = _load_dataset(args.data, args.layout)
    overrides = {"num_cameras": dataset.num_cameras} if args.sie else {}
    img_size = tuple(args.img_size) if args.img_size else None
    model, summary = train_on_dataset(args.preset, dataset, training, img_size, progress, **overrides)
    print(save_model(model, args.out, weights_dtype=weights_dtype, **summary))
    return 0


def _load_model_arg(name: str | None, num_classes: int = 0):
    """A model file (pruned or not), a preset name (the default one: cached trained weights;
    others: random weights, for timing and scoring-cost studies), or None for the default."""
    from amg.model.config import DEFAULT_PRESET, PRESETS
    from amg.model.pruned import load_pruned
    from amg.model.vit import build_model
    from amg.train.cache import default_model

    if name is None or name == DEFAULT_PRESET:
        return default_model(progress=progress)[0]
    if name in PRESETS:
        progress(f"preset {name!r} has no trained weights here: using random weights")
        import torch

        torch.manual_seed(0)
        return build_model(name, num_classes=num_classes).eval()
    return load_pruned(name)


def _model_for_eval(args: argparse.Namespace):
    return _load_model_arg(args.model)


def cmd_eval(args: argparse.Namespace) -> int:
    from amg.train.evaluate import Evaluator

    _set_threads(args.threads)
    model = _model_for_eval(args)
    dataset = _load_dataset(args.data, args.layout)
    progress(f"evaluating on {dataset.name} at {dataset.root}")
    results = Evaluator(dataset, model.config.img_size, progress).evaluate(model, args.metric)
    rows = [[name, r.num_queries, *(f"{100 * v:.2f}" for v in r.as_dict().values())] for name, r in results.items()]
    headers = ["query set", "queries", *(k if k.startswith("m") else k.replace("rank", "Rank-") for k in
                                         next(iter(results.values())).as_dict())]
    if args.json:
        print(json.dumps({name: r.as_dict() | {"queries": r.num_queries} for name, r in results.items()}, indent=2))
    else:
        print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import time

    from amg.data.layout import relabel_pids
    from amg.model.pruned import current_plan, save_pruned
    from amg.pruning.calibration import CalibrationImages
    from amg.pruning.iterative import TrainingSet, run_schedule
    from amg.pruning.macs_target import plan_for_saving
    from amg.pruning.planner import make_plan
    from amg.pruning.schedule import ONE_SHOT, Schedule, fine_tuning_stages

    _set_threads(args.threads)
    if args.macs_saving is not None and (args.heads or args.tokens):
        raise InputError("--macs-saving chooses the ratios itself: drop --heads/--tokens")
    if args.iterative_rounds > 0 and args.finetune:
        raise InputError("--finetune fine-tunes a one-shot plan, --iterative-rounds prunes in rounds: choose one")
    dataset = _load_dataset(args.data, args.layout)
    labels, _ = relabel_pids(dataset.train)
    model = _load_model_arg(args.model, num_classes=max(labels) + 1)
    if model.classifier is not None and model.num_classes != max(labels) + 1:
        raise InputError(f"the model's classifier has {model.num_classes} identities but the calibration "
                         f"data's training split has {max(labels) + 1}: calibrate on the data it was trained on")
    data = CalibrationImages.from_dataset(dataset, model.config.img_size, args.calibration_images, args.seed, progress)
    start = time.perf_counter()
    policies = {"head_policy": args.head_policy or args.policy, "token_policy": args.token_policy or args.policy,
                "allocation": args.allocation}
    if args.macs_saving is not None:
        plan = plan_for_saving(model, args.macs_saving, args.saving_by, data=data, seed=args.seed,
                               progress=progress, **policies)
    else:
        plan = make_plan(model, heads=args.heads, tokens=args.tokens, data=data, seed=args.seed,
                         progress=progress, **policies)
    schedule = ONE_SHOT
    if args.iterative_rounds > 0:
        stages = fine_tuning_stages(args.iterative_rounds, plan.ratios.get("heads", 0) > 0,
                                    plan.ratios.get("tokens", 0) > 0)
        schedule = Schedule("iterative", args.finetune_steps * stages, rounds=args.iterative_rounds)
    elif args.finetune:
        schedule = Schedule("finetune", args.finetune)
    training = None if schedule == ONE_SHOT else TrainingSet.from_dataset(dataset, model.config.img_size, progress)
    model = run_schedule(model, plan, schedule, data, training, progress)
    plan = current_plan(model)
    progress(f"scored and pruned in {time.perf_counter() - start:.1f}s: "
             f"{plan.heads_kept}/{plan.num_heads * len(plan.kept_heads)} heads kept")
    print(save_pruned(model, args.out, source=str(args.model or "default")))
    if args.plan_out:
        plan.save(args.plan_out)
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from amg.measure.flops import count_macs
    from amg.model.vit import ReIDViT

    model = _load_model_arg(args.model)
    report = count_macs(model, args.batch)
    unpruned = count_macs(ReIDViT(model.config).eval(), args.batch)
    rows = [["parameters", f"{report.params / 1e6:.3f} M", f"{unpruned.params / 1e6:.3f} M",
             f"{100 * (1 - report.params / unpruned.params):.1f}%"],
            ["GMACs / image", f"{report.gmacs_per_image:.4f}", f"{unpruned.gmacs_per_image:.4f}",
             f"{100 * (1 - report.total / unpruned.total):.1f}%"]]
    print(tabulate(rows, headers=["", "this model", "unpruned", "saved"], tablefmt="github"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from amg.reporting.report import build_report

    for path in build_report(args.results_dir, args.out):
        print(path)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from amg.benchmark.results import find_csvs
    from amg.measure.device import device_id
    from amg.reporting.report import load_reports
    from amg.reporting.select import NoMeasurements, Target, select, summary

    here = device_id()
    target = Target(args.device_id or here, args.backend, args.batch, args.precision, args.model)

    def choose():
        if not args.results_dir.is_dir() or not find_csvs(args.results_dir):
            raise NoMeasurements(f"no results CSV under {args.results_dir}")
        return select(load_reports(args.results_dir), target, args.budget_ms, args.metric, args.latency)

    try:
        selection = choose()
    except NoMeasurements as missing:
        command = (f"pytest bench/ --amg-backends {args.backend} --amg-batches {args.batch} "
                   f"--amg-precisions {args.precision} --amg-results-dir {args.results_dir}")
        if not args.measure:
            raise InputError(f"{missing}: run `{command}` on that device first, or pass --measure here") from None
        if target.device_id != here:
            raise InputError(f"{missing}, and --measure measures this device ({here}), not {target.device_id}") from None
        progress(f"{missing}: measuring now with `{command} --amg-profile {args.profile}`")
        run_suite(args)
        selection = choose()
    print(summary(selection))
    return 0 if selection.chosen is not None else 1


def run_suite(args: argparse.Namespace) -> None:
    """`pytest bench/` for the selection's backend, batch and precision (its CSV lands in results)."""
    import subprocess

    import amg

    bench = Path(amg.__file__).resolve().parent.parent / "bench"
    if not (bench / "conftest.py").is_file():
        raise InputError(f"--measure runs the suite in an AMG-Bench checkout's bench/ folder; none at {bench}")
    command = [sys.executable, "-m", "pytest", str(bench / "test_suite.py"), "-q", "-p", "no:cacheprovider",
               f"--amg-profile={args.profile}", f"--amg-backends={args.backend}", f"--amg-batches={args.batch}",
               f"--amg-precisions={args.precision}", f"--amg-results-dir={args.results_dir}"]
    if args.model:
        command.append(f"--amg-model={args.model}")
    status = subprocess.run(command).returncode
    if status != 0:  # its own output says why; not the user's input, so not exit 2
        raise SystemExit(f"amg select: the suite failed with status {status}: {' '.join(command)}")


def cmd_import(args: argparse.Namespace) -> int:
    from amg.model.checkpoints import import_state_dict
    from amg.model.vit import build_model, save_model

    overrides = {}
    if args.num_cameras is not None:
        overrides["num_cameras"] = args.num_cameras
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size)
    model = build_model(args.preset, num_classes=args.num_classes, **overrides)
    grid = tuple(args.source_grid) if args.source_grid else None
    report = import_state_dict(model, args.checkpoint, args.format, grid)
    progress(report.summary())
    print(save_model(model, args.out, imported_from=str(args.checkpoint), import_format=report.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from amg.model.config import DEFAULT_PRESET, PRESETS

    parser = argparse.ArgumentParser(
        prog="amg",
        description="AMG-Bench: Attention Map Guided pruning of ViT person Re-ID models, and its benchmarks.",
        epilog="Without --data, commands use the embedded default: a synthetic Re-ID set and a small model "
               "trained on it, both generated once and cached in $AMG_CACHE_DIR (default ~/.cache/amg-bench).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="generate or inspect Re-ID data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = data_sub.add_parser("synth", help="write the synthetic holistic + occluded set (Market-1501 layout)")
    synth.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    synth.add_argument("--ids", type=int, default=SynthConfig.train_ids, help="training identities (default %(default)s)")
    synth.add_argument("--test-ids", type=int, default=None, help="test identities (default: same as --ids)")
    synth.add_argument("--images-per-id", type=int, default=SynthConfig.images_per_id,
                       help="images per identity (default %(default)s)")
    synth.add_argument("--cameras", type=int, default=SynthConfig.num_cameras, help="cameras, 2..6 (default %(default)s)")
    synth.add_argument("--seed", type=int, default=SynthConfig.seed, help="random seed (default %(default)s)")
    synth.set_defaults(func=cmd_data_synth)
    info = data_sub.add_parser("info", help="read a data set and print its splits")
    info.add_argument("root", type=Path, help="data set root (Market-1501, DukeMTMC-reID, Occluded-Duke, MSMT17)")
    info.add_argument("--layout", default="auto", help="auto|market1501|dukemtmc|occluded_duke|msmt17")
    info.set_defaults(func=cmd_data_info)

    def add_data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help="real data set root (default: the cached synthetic set)")
        p.add_argument("--layout", default="auto", help="layout of --data (default: detect)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    train = sub.add_parser("train", help="train a Re-ID model (default: the cached embedded default)")
    train.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset (default %(default)s)")
    train.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (default %(default)s)")
    train.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (default %(default)s)")
    train.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed (default %(default)s)")
    train.add_argument("--batch-ids", type=int, default=TrainConfig.num_identities, help="identities per PK batch (default %(default)s)")
    train.add_argument("--batch-instances", type=int, default=TrainConfig.num_instances, help="images per identity in a batch (default %(default)s)")
    train.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the preset's)")
    train.add_argument("--sie", action="store_true", help="add a camera embedding (SIE) sized to the data set")
    train.add_argument("--out", default=None,
                       help="where to save the model (required with --data; without it, a copy of the cached default)")
    train.add_argument("--weights-dtype", default="fp32", choices=WEIGHTS_DTYPES,
                       help="dtype the --out file stores weights in: fp16 halves it (e.g. a model committed for CI); "
                            "loading always gives float32 (default %(default)s)")
    add_data_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="Rank-1/5/10, mAP and mINP on every query set")
    evaluate.add_argument("model", nargs="?", default=None, help="model file (default: the cached default model)")
    evaluate.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"])
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_data_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    prune = sub.add_parser("prune", help="score heads / key-value tokens on calibration images and prune",
                           description="Score on calibration images from the training split, remove heads "
                                       "(then key/value tokens, scored on the head-pruned model), save the "
                                       "smaller model with its plan.")
    prune.add_argument("--model", default=None,
                       help="model file, or a preset (the default preset uses its cached trained weights; "
                            "other presets get random weights); default: the embedded default model")
    prune.add_argument("--heads", type=float, default=0.0, help="fraction of all heads to remove, in [0, 1)")
    prune.add_argument("--tokens", type=float, default=0.0, help="fraction of key/value positions to drop, in [0, 1)")
    prune.add_argument("--policy", default="amg", choices=ALL_POLICY_NAMES,
                       help="policy for both heads and tokens (default %(default)s)")
    prune.add_argument("--head-policy", default=None, choices=sorted(HEAD_POLICIES), metavar="POLICY",
                       help="head policy, overrides --policy: " + _policy_help(HEAD_POLICIES))
    prune.add_argument("--token-policy", default=None, choices=sorted(TOKEN_POLICIES), metavar="POLICY",
                       help="token policy, overrides --policy: " + _policy_help(TOKEN_POLICIES))
    prune.add_argument("--allocation", default="global", choices=HEAD_ALLOCATIONS,
                       help="how head removals spread over blocks (default %(default)s)")
    prune.add_argument("--macs-saving", type=float, default=None,
                       help="instead of --heads/--tokens: remove about this fraction of the blocks' MACs")
    prune.add_argument("--saving-by", default="both", choices=["heads", "tokens", "both"],
                       help="what --macs-saving removes (both: equal head and token ratios)")
    prune.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                       help="fine-tune the pruned model this many steps, distilled from the unpruned one "
                            "(default 0: one-shot; the equal-MACs study uses 300)")
    prune.add_argument("--iterative-rounds", type=int, default=0,
                       help="instead: prune heads over this many rounds, fine-tuning (distilled) after each "
                            "and after the tokens; 0 = one-shot (default)")
    prune.add_argument("--finetune-steps", type=int, default=60,
                       help="fine-tuning steps per iterative round (default %(default)s)")
    prune.add_argument("--calibration-images", type=int, default=256, help="calibration images (default %(default)s)")
    prune.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and random policies")
    prune.add_argument("--out", required=True, type=Path, help="pruned model file to write")
    prune.add_argument("--plan-out", type=Path, default=None, help="also write the plan as JSON")
    add_data_options(prune)
    prune.set_defaults(func=cmd_prune)

    flops = sub.add_parser("flops", help="parameters and fvcore MACs (multiply-adds) against the unpruned model")
    flops.add_argument("model", nargs="?", default=None, help="model file or preset (default: the default model)")
    flops.add_argument("--batch", type=int, default=1, help="batch size to trace (default %(default)s)")
    flops.set_defaults(func=cmd_flops)

    report = sub.add_parser("report", help="merge every results CSV into Markdown tables and Pareto plots")
    report.add_argument("--results-dir", type=Path, default=Path("results"),
                        help="folder holding <device-id>/<run-id>.csv reports (default %(default)s)")
    report.add_argument("--out", type=Path, default=Path("results/report"),
                        help="where README.md and the PNG plots go (default %(default)s)")
    report.set_defaults(func=cmd_report)

    select = sub.add_parser(
        "select", help="hardware-aware: the most accurate plan whose measured latency fits a budget",
        description="Choose, from the suite's measurements on a device, the pruning configuration with the "
                    "best accuracy whose measured median latency fits --budget-ms, and print the Pareto "
                    "frontier (latency against accuracy). Exit 0 when one fits, 1 when none does.")
    select.add_argument("--budget-ms", type=float, required=True, help="latency budget per batch, milliseconds")
    select.add_argument("--backend", required=True, choices=BACKEND_NAMES, help="where the model will run")
    select.add_argument("--batch", type=int, default=1, help="batch size (default %(default)s)")
    select.add_argument("--precision", default="fp32", choices=PRECISIONS, help="(default %(default)s)")
    select.add_argument("--metric", default="query_mAP",
                        help="accuracy to maximise: query_|occluded_ + rank1|rank5|mAP|mINP (default %(default)s)")
    select.add_argument("--latency", default="paired", choices=("paired", "median"),
                        help="paired: the unpruned median of the same run / the interleaved speed-up (steady on "
                             "a shared machine); median: each configuration's own median (default %(default)s)")
    select.add_argument("--model", default=None, help="only this model preset (default: any measured)")
    select.add_argument("--device-id", default=None,
                        help="device whose measurements to use (default: this one, as the suite names it)")
    select.add_argument("--results-dir", type=Path, default=Path("results"),
                        help="folder of <device-id>/<run-id>.csv reports (default %(default)s)")
    select.add_argument("--measure", action="store_true",
                        help="with no measurements for this device/backend/batch, run the suite here first")
    select.add_argument("--profile", default="default", help="suite profile for --measure (default %(default)s)")
    select.set_defaults(func=cmd_select)

    # listed for --help only: main() hands `amg gate ...` to amg.reporting.gate.main before parsing
    sub.add_parser("gate", add_help=False,
                   help="compare a run's CSV with a baseline CSV; exit 0 pass, 1 regression, 2 input error "
                        "(`amg gate --help` for its options)")

    imp = sub.add_parser("import", help="convert a TransReID / timm / LA-Transformer .pth into an amg model file")
    imp.add_argument("checkpoint", type=Path, help="the .pth state dict")
    imp.add_argument("--preset", required=True, choices=sorted(PRESETS), help="architecture the weights belong to")
    imp.add_argument("--out", required=True, type=Path, help="amg model file to write")
    imp.add_argument("--format", default="auto", help="auto|transreid|timm|la_transformer")
    imp.add_argument("--num-classes", type=int, default=0, help="training identities of its classifier (0: none)")
    imp.add_argument("--num-cameras", type=int, default=None, help="SIE cameras (default: the preset's)")
    imp.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the preset's)")
    imp.add_argument("--source-grid", type=int, nargs=2, metavar=("ROWS", "COLS"),
                     help="the checkpoint's patch grid, when its position embedding is not square")
    imp.set_defaults(func=cmd_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gate"]:  # the gate owns its options (argparse cannot hand "--help" through)
        from amg.reporting.gate import main as gate_main

        return gate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (InputError, OSError) as error:
        # Bad input (and missing or unwritable files) is the user's to fix: say what, without a
        # traceback. Anything else is a bug or a failure inside a library: its traceback stays.
        print(f"amg {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
