"""The `amg` command line: subcommands, their options and help (choices come from the registries)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from amg.cli import commands
from amg.cli.study import add_study_parser
from amg.data.synthetic import SynthConfig
from amg.measure.backend_registry import BACKEND_NAMES, PRECISIONS
from amg.pruning.policies import (
    ALL_POLICY_NAMES,
    CALIBRATION_BATCH,
    HEAD_ALLOCATIONS,
    HEAD_POLICIES,
    MLP_POLICIES,
    SAVING_MODES,
    TOKEN_POLICIES,
    Policy,
)
from amg.train.config import TrainConfig

WEIGHTS_DTYPES = ("fp32", "fp16")


def _checked(cast, accept, what: str):
    """An argparse type: a bad value is a usage error (exit 2) that names what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _policy_help(policies: dict[str, Policy]) -> str:
    return "; ".join(f"{name} ({p.summary})" for name, p in policies.items())


def build_parser() -> argparse.ArgumentParser:
    from amg.model.checkpoint_formats import FORMATS
    from amg.model.config import DEFAULT_PRESET, NECK_FEATS, PRESETS

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
    synth.add_argument("--ids", type=positive_int, default=SynthConfig.train_ids, help="training identities (default %(default)s)")
    synth.add_argument("--test-ids", type=non_negative_int, default=None, help="test identities (default: same as --ids)")
    synth.add_argument("--images-per-id", type=positive_int, default=SynthConfig.images_per_id,
                       help="images per identity (default %(default)s)")
    synth.add_argument("--cameras", type=positive_int, default=SynthConfig.num_cameras, help="cameras, 2..6 (default %(default)s)")
    synth.add_argument("--seed", type=non_negative_int, default=SynthConfig.seed, help="random seed (default %(default)s)")
    synth.set_defaults(func=commands.cmd_data_synth)
    info = data_sub.add_parser("info", help="read a data set and print its splits")
    info.add_argument("root", type=Path, help="data set root (Market-1501, DukeMTMC-reID, Occluded-Duke, MSMT17)")
    info.add_argument("--layout", default="auto", help="auto|market1501|dukemtmc|occluded_duke|msmt17")
    info.set_defaults(func=commands.cmd_data_info)

    def add_data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help="real data set root (default: the cached synthetic set)")
        p.add_argument("--layout", default="auto", help="layout of --data (default: detect)")
        p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")

    train = sub.add_parser("train", help="train a Re-ID model (default: the cached embedded default)")
    train.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset (default %(default)s)")
    train.add_argument("--steps", type=positive_int, default=TrainConfig.steps, help="optimizer steps (default %(default)s)")
    train.add_argument("--lr", type=positive_float, default=TrainConfig.lr, help="peak learning rate (default %(default)s)")
    train.add_argument("--seed", type=non_negative_int, default=TrainConfig.seed, help="random seed (default %(default)s)")
    train.add_argument("--batch-ids", type=positive_int, default=TrainConfig.num_identities,
                       help="identities per PK batch; under torchrun the global batch's, split over the "
                            "processes: a multiple of their number (default %(default)s)")
    train.add_argument("--batch-instances", type=positive_int, default=TrainConfig.num_instances, help="images per identity in a batch (default %(default)s)")
    train.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"), help="input size (default: the preset's)")
    train.add_argument("--sie", action="store_true", help="add a camera embedding (SIE) sized to the data set")
    train.add_argument("--out", default=None,
                       help="where to save the model (required with --data; without it, a copy of the cached default)")
    train.add_argument("--resume", action="store_true",
                       help="with --data: continue an interrupted run from its checkpoint (<out>.resume, written "
                            "every 100 steps); the cached default model always continues")
    train.add_argument("--weights-dtype", default="fp32", choices=WEIGHTS_DTYPES,
                       help="dtype the --out file stores weights in: fp16 halves it (e.g. a model committed for CI); "
                            "loading always gives float32 (default %(default)s)")
    add_data_options(train)
    train.set_defaults(func=commands.cmd_train)

    evaluate = sub.add_parser("eval", help="Rank-1/5/10, mAP and mINP on every query set")
    evaluate.add_argument("model", nargs="?", default=None, help="model file (default: the cached default model)")
    evaluate.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"])
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--against", default=None, metavar="OTHER",
                          help="also evaluate model file OTHER on the same queries and print the difference "
                               "(Rank-1, mAP) with a 95%% paired bootstrap interval over the queries")
    evaluate.add_argument("--neck-feat", default=None, choices=NECK_FEATS,
                          help="retrieval feature: the class token after the BN neck or before it (TransReID's "
                               "TEST.NECK_FEAT), or la-parts: LA-Transformer's own test feature (14 pooled, "
                               "normalised part features); default: what the model file says (imports: their source's)")
    add_data_options(evaluate)
    evaluate.set_defaults(func=commands.cmd_eval)

    prune = sub.add_parser("prune", help="score heads / key-value tokens on calibration images and prune",
                           description="Score on calibration images from the training split, remove heads "
                                       "(then key/value tokens, scored on the head-pruned model), save the "
                                       "smaller model with its plan.")
    prune.add_argument("--model", default=None,
                       help="model file, or a preset (the default preset uses its cached trained weights; "
                            "other presets get random weights); default: the embedded default model")
    prune.add_argument("--heads", type=float, default=0.0, help="fraction of all heads to remove, in [0, 1)")
    prune.add_argument("--tokens", type=float, default=0.0, help="fraction of key/value positions to drop, in [0, 1)")
    prune.add_argument("--mlp", type=float, default=0.0,
                       help="fraction of all MLP hidden channels to remove, in [0, 1) (scored on the model with "
                            "its heads and tokens pruned)")
    prune.add_argument("--mlp-policy", default="taylor", choices=sorted(MLP_POLICIES), metavar="POLICY",
                       help="MLP channel policy: " + _policy_help(MLP_POLICIES) + " (default %(default)s)")
    prune.add_argument("--mlp-multiple", type=positive_int, default=1, metavar="N",
                       help="round each block's kept MLP channels to a multiple of N, e.g. 8 or 16 for runtimes' "
                            "kernels (default %(default)s)")
    prune.add_argument("--policy", default="amg", choices=ALL_POLICY_NAMES,
                       help="policy for both heads and tokens (default %(default)s)")
    prune.add_argument("--head-policy", default=None, choices=sorted(HEAD_POLICIES), metavar="POLICY",
                       help="head policy, overrides --policy: " + _policy_help(HEAD_POLICIES))
    prune.add_argument("--token-policy", default=None, choices=sorted(TOKEN_POLICIES), metavar="POLICY",
                       help="token policy, overrides --policy: " + _policy_help(TOKEN_POLICIES))
    prune.add_argument("--allocation", default="global", choices=HEAD_ALLOCATIONS,
                       help="how head removals spread over blocks: global = one ranking over all blocks, "
                            "which may empty a block (the reference); keep-one = the same, every block keeps "
                            "a head; per-block = the same fraction in every block; normalized = entropy over "
                            "its maximum, one ranking (default %(default)s)")
    prune.add_argument("--macs-saving", type=float, default=None,
                       help="instead of --heads/--tokens: remove about this fraction of the blocks' MACs")
    prune.add_argument("--saving-by", default="both", choices=list(SAVING_MODES),
                       help="what --macs-saving removes at one shared ratio (both: heads and tokens; heads-mlp: heads "
                            "and MLP channels, the axes of the tp-* policies; all: heads, tokens and MLP channels)")
    prune.add_argument("--finetune", type=non_negative_int, default=0, metavar="STEPS",
                       help="fine-tune the pruned model this many steps, distilled from the unpruned one "
                            "(default 0: one-shot; the equal-MACs study uses 300)")
    prune.add_argument("--iterative-rounds", type=non_negative_int, default=0,
                       help="instead: prune heads over this many rounds, fine-tuning (distilled) after each "
                            "and after the tokens; 0 = one-shot (default)")
    prune.add_argument("--finetune-steps", type=non_negative_int, default=60,
                       help="fine-tuning steps per iterative round (default %(default)s)")
    prune.add_argument("--calibration-images", type=positive_int, default=256, help="calibration images (default %(default)s)")
    prune.add_argument("--calibration-batch", type=positive_int, default=CALIBRATION_BATCH,
                       help="calibration batch size: AMG's token score adds |mean A x dL/dA| per batch, a "
                            "smaller last batch included; head entropy leaves that batch out, as the reference "
                            "does (default %(default)s)")
    prune.add_argument("--calibration-loss", default="id", choices=("id", "reference"),
                       help="id: the model's ID cross-entropy in eval mode; reference: as the reference, in "
                            "train mode with flips, ID cross-entropy + 0.2 x KL to the unpruned model "
                            "(default %(default)s)")
    prune.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed for calibration sampling, random policies and the reference loss's flips")
    prune.add_argument("--out", required=True, type=Path, help="pruned model file to write")
    prune.add_argument("--plan-out", type=Path, default=None, help="also write the plan as JSON")
    add_data_options(prune)
    prune.set_defaults(func=commands.cmd_prune)

    flops = sub.add_parser("flops", help="parameters and fvcore MACs (multiply-adds) against the unpruned model")
    flops.add_argument("model", nargs="?", default=None, help="model file or preset (default: the default model)")
    flops.add_argument("--batch", type=positive_int, default=1, help="batch size to trace (default %(default)s)")
    flops.add_argument("--reach", action="store_true",
                       help="also print the largest MACs saving heads, tokens and both can reach on this architecture")
    flops.set_defaults(func=commands.cmd_flops)

    export = sub.add_parser(
        "export", help="write a (pruned) model as a deployable ONNX or OpenVINO artifact with a manifest",
        description="Export MODEL to DIR: model.onnx (ONNX Runtime) or model.xml/.bin (OpenVINO), and manifest.json "
                    "with the plan, MACs, input names and shapes, exporter and opset, runtime versions, the largest "
                    "difference from PyTorch on real query images, and Rank-1/mAP of the exported model next to "
                    "PyTorch's on every query set. int8 calibrates on training images of the data set (ONNX "
                    "Runtime static QDQ for onnx, NNCF for openvino). EViT/ToMe models export through the dynamo "
                    "exporter.")
    export.add_argument("model", nargs="?", default=None, help="model file or preset (default: the default model)")
    export.add_argument("--format", required=True, choices=["onnx", "openvino"], help="artifact format")
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                        help="fp32; fp16 (openvino: half-precision weights); int8 (post-training quantization) "
                             "(default %(default)s)")
    export.add_argument("--batch", type=int, default=0,
                        help="fixed batch size of the graph; 0 leaves the batch axis free (default %(default)s)")
    export.add_argument("--calibration-images", type=positive_int, default=256,
                        help="training images int8 calibrates on (default %(default)s)")
    export.add_argument("--full-last-block", action="store_true",
                        help="export the whole last block; by default it is computed for the class token only "
                             "(the same features, fewer MACs: a Re-ID model's feature is its class token)")
    export.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="new (or empty) folder to write the artifact and manifest to")
    add_data_options(export)
    export.set_defaults(func=commands.cmd_export)

    report = sub.add_parser("report", help="merge every results CSV into Markdown tables and Pareto plots")
    report.add_argument("--results-dir", type=Path, default=Path("results"),
                        help="folder holding <device-id>/<run-id>.csv reports (default %(default)s)")
    report.add_argument("--out", type=Path, default=Path("results/report"),
                        help="where README.md and the PNG plots go (default %(default)s)")
    report.set_defaults(func=commands.cmd_report)

    select = sub.add_parser(
        "select", help="hardware-aware: the most accurate plan whose measured latency fits a budget",
        description="Choose, from the suite's measurements on a device, the pruning configuration with the "
                    "best accuracy whose measured median latency fits --budget-ms, and print the Pareto "
                    "frontier (latency against accuracy). Exit 0 when one fits, 1 when none does.")
    select.add_argument("--budget-ms", type=positive_float, required=True, help="latency budget per batch, milliseconds")
    select.add_argument("--backend", required=True, choices=BACKEND_NAMES, help="where the model will run")
    select.add_argument("--batch", type=positive_int, default=1, help="batch size (default %(default)s)")
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
    select.set_defaults(func=commands.cmd_select)

    # listed for --help only: main() hands `amg gate ...` to amg.reporting.gate_cli.main before parsing
    sub.add_parser("gate", add_help=False,
                   help="compare a run's CSV with a baseline CSV (or this CPU's in a folder); exit 0 pass, "
                        "1 regression, 2 input error (`amg gate --help` for its options)")

    baseline = sub.add_parser(
        "baseline", help="make a gate baseline for one CPU from reruns of one benchmark on it",
        description="Combine reruns of one benchmark on one CPU model (same configurations, thread count, "
                    "device id and input size; accuracy and MACs equal) into one baseline CSV for `amg gate`: "
                    "each row is the first run's, with the reruns' median speed-up and latencies and a speed-up "
                    "interval spanning every rerun's, so the gate sees how far reruns drift. With --into it lands "
                    "in a baseline folder named after its CPU (e.g. amd-epyc-2t.csv); the gate picks it by the "
                    "CPU named in its rows.")
    baseline.add_argument("runs", nargs="+", type=Path, metavar="RUN.csv", help="two or more reruns' CSVs")
    where = baseline.add_mutually_exclusive_group(required=True)
    where.add_argument("--into", type=Path, metavar="DIR",
                       help="baseline folder: writes DIR/<cpu>-<threads>t.csv (replaced atomically)")
    where.add_argument("--out", type=Path, metavar="FILE", help="baseline CSV to write (replaced atomically)")
    baseline.set_defaults(func=commands.cmd_baseline)

    imp = sub.add_parser("import", help="convert a TransReID / timm / LA-Transformer .pth into an amg model file")
    imp.add_argument("checkpoint", type=Path, help="the .pth state dict")
    imp.add_argument("--preset", required=True, choices=sorted(PRESETS), help="architecture the weights belong to")
    imp.add_argument("--out", required=True, type=Path, help="amg model file to write")
    imp.add_argument("--format", default="auto", choices=["auto", *sorted(FORMATS)], help="(default: detect)")
    imp.add_argument("--neck-feat", default=None, choices=NECK_FEATS,
                     help="retrieval feature the file records (default: the source's: before the neck for "
                          "TransReID's configs and for timm / LA-Transformer backbones, whose neck is untrained; "
                          "la-parts: LA-Transformer's own test feature, its 14 pooled part features)")
    imp.add_argument("--num-classes", type=non_negative_int, default=0, help="training identities of its classifier (0: none)")
    imp.add_argument("--num-cameras", type=non_negative_int, default=None, help="SIE cameras (default: the preset's)")
    imp.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"), help="input size (default: the preset's)")
    imp.add_argument("--source-grid", type=positive_int, nargs=2, metavar=("ROWS", "COLS"),
                     help="the checkpoint's patch grid, when its position embedding is not square")
    imp.set_defaults(func=commands.cmd_import)

    add_study_parser(sub, positive_int, non_negative_int)
    return parser
