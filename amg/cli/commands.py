"""What each `amg` subcommand does (`parser` maps the command line onto these functions).

Every subcommand prints progress to stderr and results to stdout, so results can be piped.
Heavy imports (torch, timm, fvcore) happen inside the commands that need them, so that
`amg report`, `amg select`, `amg gate` and `amg baseline` run without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from amg.data.synthetic import SynthConfig
from amg.errors import InputError
from amg.train.config import TrainConfig


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
    from amg.train.distributed import session

    with session():  # under torchrun, one of the processes that train together
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from amg.model.vit import read_checkpoint, save_model
    from amg.train.cache import default_model, resume_path, train_on_dataset
    from amg.train.distributed import is_main, main_first

    _set_threads(args.threads)
    training = _training_config(args)
    import torch

    weights_dtype = torch.float16 if args.weights_dtype == "fp16" else None
    if args.data is None and not (args.img_size or args.sie):  # the embedded default: cached, copied if asked
        model, path = default_model(args.preset, training=training, progress=progress)
        if is_main():
            print(save_model(model, args.out, weights_dtype=weights_dtype, **read_checkpoint(path).get("meta", {}))
                  if args.out else path)
        return 0
    if args.out is None:
        raise InputError("--out is required when training on --data")
    with main_first():  # one process generates the synthetic set, if it must be
        dataset = _load_dataset(args.data, args.layout)
    overrides = {"num_cameras": dataset.num_cameras} if args.sie else {}
    img_size = tuple(args.img_size) if args.img_size else None
    checkpoint = resume_path(Path(args.out))
    if checkpoint.exists() and not args.resume:
        raise InputError(f"{checkpoint} holds an unfinished run's checkpoint: pass --resume to continue it, "
                         "or delete it to start over")
    model, summary = train_on_dataset(args.preset, dataset, training, img_size, progress, checkpoint=checkpoint,
                                      **overrides)
    if is_main():
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


def _model_for_eval(args: argparse.Namespace, path: str | None):
    model = _load_model_arg(path)
    if args.neck_feat:
        from amg.model.vit import set_neck_feat

        set_neck_feat(model, args.neck_feat)
    return model


def cmd_eval(args: argparse.Namespace) -> int:
    from amg.model.config import describe_feature
    from amg.train.evaluate import Evaluator

    _set_threads(args.threads)
    model = _model_for_eval(args, args.model)
    dataset = _load_dataset(args.data, args.layout)
    progress(f"retrieval feature: {describe_feature(model.neck_feat)}")
    progress(f"evaluating on {dataset.name} at {dataset.root}")
    evaluator = Evaluator(dataset, model.config.img_size, progress)
    results = evaluator.evaluate(model, args.metric)
    if args.against:
        other = _model_for_eval(args, args.against)
        if other.config.img_size != model.config.img_size:
            raise InputError(f"--against {args.against} takes {other.config.img_size} images, the model "
                             f"{model.config.img_size}: a paired comparison needs the same query images")
        progress(f"evaluating {args.against} on the same queries")
        return _print_comparison(args, results, evaluator.evaluate(other, args.metric))
    rows = [[name, r.num_queries, r.num_skipped, *(f"{100 * v:.2f}" for v in r.as_dict().values())]
            for name, r in results.items()]
    headers = ["query set", "queries", "without a match", *(k if k.startswith("m") else k.replace("rank", "Rank-")
                                                            for k in next(iter(results.values())).as_dict())]
    for name, r in results.items():
        if r.num_skipped:  # the protocol leaves them out of every metric: say how many
            progress(f"{name}: {r.num_skipped} queries have no match in the gallery and are not scored")
    if args.json:
        print(json.dumps({name: r.as_dict() | {"queries": r.num_queries, "without_match": r.num_skipped}
                          for name, r in results.items()}, indent=2))
    else:
        print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0


def _print_comparison(args: argparse.Namespace, model_results: dict, other_results: dict) -> int:
    from amg.train.accuracy_difference import paired_difference

    differences = {name: [paired_difference(other_results[name], model_results[name], metric)
                          for metric in ("rank1", "mAP")] for name in model_results}
    if args.json:
        print(json.dumps({name: {d.metric: {"against": d.a, "model": d.b, "difference": d.delta,
                                            "ci95": [d.low, d.high]} for d in found}
                          for name, found in differences.items()}, indent=2))
        return 0
    rows = [[name, d.metric.replace("rank1", "Rank-1"), f"{100 * d.a:.2f}", f"{100 * d.b:.2f}",
             f"{100 * d.delta:+.2f}", f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}]",
             ("better" if d.low > 0 else "worse") if d.decided else "no clear difference"]
            for name, found in differences.items() for d in found]
    print(f"{args.model or 'the default model'} against {args.against}, paired bootstrap over the queries:")
    print(tabulate(rows, headers=["query set", "metric", "against", "model", "difference", "95% interval",
                                  "verdict"], tablefmt="github"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from amg.train.distributed import session

    with session():  # under torchrun, one of the processes that fine-tune together
        return _prune(args)


def _prune(args: argparse.Namespace) -> int:
    import time

    from amg.data.layout import relabel_pids
    from amg.files import writing_together
    from amg.model.pruned import current_plan, save_pruned
    from amg.pruning.calibration import CalibrationImages
    from amg.pruning.iterative import TrainingSet, run_schedule
    from amg.pruning.macs_target import plan_for_saving
    from amg.pruning.planner import check_plan_removes, make_plan
    from amg.train.distributed import is_main, main_first

    for option, path in (("--out", args.out), ("--plan-out", args.plan_out)):
        if path is not None and Path(path).is_dir():  # found now, not after minutes of scoring
            raise InputError(f"{option} {path} is a folder: give a file name")
    from amg.pruning.schedule import ONE_SHOT, Schedule, fine_tuning_stages

    _set_threads(args.threads)
    if args.macs_saving is not None and (args.heads or args.tokens or args.mlp):
        raise InputError("--macs-saving chooses the ratios itself: drop --heads/--tokens/--mlp")
    if args.iterative_rounds > 0 and args.finetune:
        raise InputError("--finetune fine-tunes a one-shot plan, --iterative-rounds prunes in rounds: choose one")
    with main_first():  # one process generates the synthetic set, if it must be
        dataset = _load_dataset(args.data, args.layout)
    labels, _ = relabel_pids(dataset.train)
    model = _load_model_arg(args.model, num_classes=max(labels) + 1)
    if model.classifier is not None and model.num_classes != max(labels) + 1:
        raise InputError(f"the model's classifier has {model.num_classes} identities but the calibration "
                         f"data's training split has {max(labels) + 1}: calibrate on the data it was trained on")
    data = CalibrationImages.from_dataset(dataset, model.config.img_size, args.calibration_images, args.seed, progress,
                                          args.calibration_batch, args.calibration_loss)
    start = time.perf_counter()
    policies = {"head_policy": args.head_policy or args.policy, "token_policy": args.token_policy or args.policy,
                "allocation": args.allocation, "mlp_policy": args.mlp_policy, "mlp_multiple": args.mlp_multiple}
    before = current_plan(model)
    if args.macs_saving is not None:
        plan = plan_for_saving(model, args.macs_saving, args.saving_by, data=data, seed=args.seed,
                               progress=progress, **policies)
    else:
        plan = make_plan(model, heads=args.heads, tokens=args.tokens, mlp=args.mlp, data=data, seed=args.seed,
                         progress=progress, **policies)
    check_plan_removes(before, plan)  # before any fine-tuning: a ratio that rounds to nothing is refused
    schedule = ONE_SHOT
    if args.iterative_rounds > 0:
        stages = fine_tuning_stages(args.iterative_rounds, plan.ratios.get("heads", 0) > 0,
                                    plan.ratios.get("tokens", 0) > 0, plan.ratios.get("mlp", 0) > 0)
        schedule = Schedule("iterative", args.finetune_steps * stages, rounds=args.iterative_rounds)
    elif args.finetune:
        schedule = Schedule("finetune", args.finetune)
    training = None if schedule == ONE_SHOT else TrainingSet.from_dataset(dataset, model.config.img_size, progress)
    model = run_schedule(model, plan, schedule, data, training, progress)
    plan = current_plan(model)
    progress(f"scored and pruned in {time.perf_counter() - start:.1f}s: "
             f"{plan.heads_kept}/{plan.num_heads * len(plan.kept_heads)} heads kept")
    if is_main():
        with writing_together(args.out):  # a concurrent prune to the same --out writes its pair after this one
            print(save_pruned(model, args.out, source=str(args.model or "default")))
            if args.plan_out:
                plan.save(args.plan_out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from amg.benchmark.artifact import ExportRequest, export_model
    from amg.pruning.calibration import CalibrationImages

    request = ExportRequest(args.format, args.precision, args.batch, args.threads or torch.get_num_threads())
    _set_threads(args.threads)
    model = _load_model_arg(args.model)
    # a feature that reads the patch tokens (LA-Transformer's parts) needs the whole last block
    model.use_class_token_last_block(not (args.full_last_block or model.reads_patch_tokens))
    dataset = _load_dataset(args.data, args.layout)
    calibration = None
    if args.precision == "int8":
        calibration = CalibrationImages.from_dataset(dataset, model.config.img_size, count=args.calibration_images,
                                                     progress=progress).images
    manifest = export_model(model, args.out, request, dataset, calibration, args.model or "default", progress)
    rows = [[name, values["queries"], *(f"{100 * values[side][metric]:.2f}" for side in ("pytorch", "exported")
                                        for metric in ("rank1", "mAP"))]
            for name, values in manifest["accuracy"]["query_sets"].items()]
    print(tabulate(rows, headers=["query set", "queries", "PyTorch Rank-1", "PyTorch mAP", "exported Rank-1",
                                  "exported mAP"], tablefmt="github"))
    parity = manifest["parity"]
    print(f"max |exported - PyTorch| on {parity['images']} query images: {parity['max_abs_diff']:.2e} "
          f"(min cosine {parity['min_cosine']:.5f}); MACs saved {100 * manifest['macs_saving']:.1f}%")
    print(args.out / manifest["file"])
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from amg.measure.flops import count_macs
    from amg.model.vit import ReIDViT

    model = _load_model_arg(args.model)
    report = count_macs(model, args.batch)
    # the same model before pruning: its classifier (absent from a bare preset) counts too
    unpruned = count_macs(ReIDViT(model.config, num_classes=model.num_classes).eval(), args.batch)
    rows = [["parameters", f"{report.params / 1e6:.3f} M", f"{unpruned.params / 1e6:.3f} M",
             f"{100 * (1 - report.params / unpruned.params):.1f}%"],
            ["GMACs / image", f"{report.gmacs_per_image:.4f}", f"{unpruned.gmacs_per_image:.4f}",
             f"{100 * (1 - report.total / unpruned.total):.1f}%"]]
    print(tabulate(rows, headers=["", "this model", "unpruned", "saved"], tablefmt="github"))
    if args.reach:
        from amg.pruning.macs_target import reachable_savings

        limits = [[mode, f"{100 * saving:.1f}%"] for mode, saving in reachable_savings(model.config).items()]
        print("\nthe most of the unpruned model's MACs static pruning can remove (EViT and ToMe shorten "
              "the sequence for the MLP too and go further):")
        print(tabulate(limits, headers=["pruned by", "MACs saved at most"], tablefmt="github"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from amg.reporting.report import build_report

    for path in build_report(args.results_dir, args.out):
        print(path)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from amg.reporting.baselines import make_baseline
    from amg.reporting.run_frames import machine

    if args.into:
        args.into.mkdir(parents=True, exist_ok=True)
    baseline = make_baseline(args.runs, args.out or args.into)
    print(f"{baseline.path}: {len(baseline.frame)} rows from {len(args.runs)} runs on {machine(baseline.frame)} "
          "(speed-ups: the runs' median, intervals spanning theirs)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from amg.benchmark.results import find_csvs
    from amg.measure.device import device_id
    from amg.reporting.loading import load_reports
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
    from amg.model.pruned import save_pruned
    from amg.model.vit import build_model, save_model

    overrides = {}
    if args.num_cameras is not None:
        overrides["num_cameras"] = args.num_cameras
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size)
    model = build_model(args.preset, num_classes=args.num_classes, **overrides)
    grid = tuple(args.source_grid) if args.source_grid else None
    report = import_state_dict(model, args.checkpoint, args.format, grid, neck_feat=args.neck_feat)
    progress(report.summary())
    for warning in report.warnings:
        progress(f"warning: {warning}")
    meta = {"imported_from": str(args.checkpoint), "import_format": report.format}
    # A source that was pruned (reference token masks) keeps its plan in the file.
    save = save_pruned if report.plan is not None else save_model
    print(save(model, args.out, **meta))
    return 0
