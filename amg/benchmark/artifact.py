"""`amg export`: a (pruned) model as a deployable ONNX or OpenVINO artifact, with a manifest
saying what it is and how faithful it is.

The manifest (`manifest.json`) holds the plan, MACs, input names and shapes, the exporter and
opset, the runtime versions, the largest difference from PyTorch on real query images, and
Rank-1 / mAP of the exported model against PyTorch's on the data set's query sets. The folder
is assembled under a temporary name and renamed into place: an interrupted export leaves no
half-written artifact behind.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import amg
from amg.data.layout import ReIDDataset
from amg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from amg.errors import InputError
from amg.measure.export import (
    FEATURES,
    calibration_feeds,
    example_inputs,
    export_onnx,
    exporter_of,
    input_names,
    load_artifact,
    model_inputs,
    openvino_model,
    quantize_onnx_int8,
    runtime_versions,
    save_openvino,
)
from amg.measure.flops import count_macs
from amg.model.config import describe_feature
from amg.model.pruned import current_plan
from amg.model.vit import ReIDViT, refuse_beyond_memory
from amg.train.evaluate import Evaluator, extract_fixed_batch_features

FORMATS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "fp16", "int8")}
MANIFEST = "manifest.json"
PARITY_IMAGES = 64  # real query images the exported features are compared on
EVALUATION_BATCH = 64
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    format: str
    precision: str = "fp32"
    batch: int = 0  # 0: the batch axis is left free
    threads: int = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"unknown export format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.precision not in FORMATS[self.format]:
            hint = " (ONNX Runtime's CPU provider computes an fp16 graph in fp32: export fp32 or int8, or " \
                   "--format openvino --precision fp16)" if self.precision == "fp16" else ""
            raise InputError(f"--format {self.format} exports {', '.join(FORMATS[self.format])}, not "
                             f"{self.precision}{hint}")
        if self.batch < 0:
            raise InputError(f"--batch must be >= 1, or 0 for a free batch axis; got {self.batch}")


def export_model(model: ReIDViT, out: str | Path, request: ExportRequest, dataset: ReIDDataset,
                 calibration: torch.Tensor | None, source: str, progress: Progress) -> dict[str, Any]:
    """Write `model`'s artifact and manifest to the new folder `out`; returns the manifest.
    `calibration`: uint8 images INT8 calibrates on; `dataset`: where parity images and accuracy come from."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder: export into a new one")
    if request.precision == "int8" and calibration is None:
        raise InputError("INT8 needs calibration images")
    _refuse_batches_beyond_memory(model, request.batch)
    model = model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the finished folder private
    owner = _own_staging(staging)  # held until the export ends: a killed export's folder is stale
    try:
        artifact = _write_artifact(model, staging, request, calibration, progress)
        manifest = _manifest(model, artifact, request, dataset, source, progress)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above): replaced by the finished folder
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        owner.close()
    return manifest


STAGING_LOCK = ".exporting"  # inside a staging folder, locked (flock) by the export writing it


def _own_staging(staging: Path):
    handle = open(staging / STAGING_LOCK, "w")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging folders of exports of `out` that were killed (SIGKILL leaves no `finally`):
    a folder whose lock no live export holds. A live export's folder is left alone."""
    for staging in out.parent.glob(f".{out.name}.*"):
        lock = staging / STAGING_LOCK
        if staging.is_symlink() or not staging.is_dir() or not lock.is_file():
            continue  # not a staging folder this project made
        with open(lock) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live export's
            shutil.rmtree(staging, ignore_errors=True)


def _refuse_batches_beyond_memory(model: ReIDViT, batch: int) -> None:
    """An export traces the model on a batch: its activations must fit before tracing starts."""
    config = model.config
    per_image = config.num_tokens * (config.embed_dim * (3 + config.mlp_ratio) + config.num_heads * config.num_tokens)
    refuse_beyond_memory(max(batch, 1) * per_image * 4 * 2,  # float32, and the exporter's copy beside the traced values
                         f"--batch {batch}: tracing the model on it",
                         "; export a smaller batch or 0 (a free batch axis)")


def _write_artifact(model: ReIDViT, folder: Path, request: ExportRequest, calibration: torch.Tensor | None,
                    progress: Progress) -> Path:
    example_batch = request.batch or 2  # a free axis is traced at 2 so that no size-1 axis is folded away
    exporter = exporter_of(model)
    progress(f"exporting to ONNX ({exporter['name']}, opset {exporter['opset']}, batch {request.batch or 'free'})")
    try:
        inputs = model_inputs(*example_inputs(model, example_batch))
        onnx_path = export_onnx(model, inputs, folder / "model.onnx", dynamic_batch=request.batch == 0)
    except Exception as error:
        if getattr(model, "dynamic_tokens", None) is None:
            raise  # a static plan that does not export is a bug to see
        raise InputError(f"the dynamic token policy {model.dynamic_tokens['policy']!r} did not export "
                         f"({type(error).__name__}: {str(error)[:200]})") from error
    feeds = None
    if request.precision == "int8":
        feeds = calibration_feeds(input_names(model), normalize(calibration), request.batch or 1)
        progress(f"calibrating INT8 on {len(calibration)} images")
    if request.format == "onnx":
        if request.precision == "int8":
            quantize_onnx_int8(onnx_path, folder / "model.int8.onnx", feeds)
            onnx_path.unlink()
            return (folder / "model.int8.onnx").rename(folder / "model.onnx")
        return onnx_path
    ov_model = openvino_model(onnx_path, request.precision, feeds)
    path = save_openvino(ov_model, folder / "model.xml", request.precision)
    onnx_path.unlink()
    return path


def _manifest(model: ReIDViT, artifact: Path, request: ExportRequest, dataset: ReIDDataset, source: str,
              progress: Progress) -> dict[str, Any]:
    features = load_artifact(artifact, request.precision, request.threads)
    batch = request.batch or EVALUATION_BATCH
    evaluator = Evaluator(dataset, model.config.img_size, progress)
    parity = _parity(model, features, batch, evaluator)
    progress("accuracy of the PyTorch model")
    reference = evaluator.evaluate(model)
    progress(f"accuracy of the exported model ({request.format} {request.precision})")
    exported = evaluator.evaluate(model, compiled=(features, batch))
    macs, base = count_macs(model).total, _unpruned_macs(model)
    height, width = model.config.img_size
    axis: Any = request.batch or "batch"
    inputs = [{"name": "images", "shape": [axis, 3, height, width], "dtype": "float32",
               "layout": "NCHW, RGB, scaled to [0, 1] then normalised", "mean": list(IMAGENET_MEAN),
               "std": list(IMAGENET_STD)}]
    if model.sie_embed is not None:
        inputs.append({"name": "camids", "shape": [axis], "dtype": "int64"})
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "amg_version": amg.__version__,
        "source": source,
        "format": request.format,
        "precision": request.precision,
        "precision_detail": _precision_detail(request),
        "file": artifact.name,
        "inputs": inputs,
        "outputs": [{"name": FEATURES, "shape": [axis, model.feature_dim], "dtype": "float32",
                     "meaning": f"retrieval feature ({describe_feature(model.neck_feat)})"}],
        "model": {"preset": model.config.name, "img_size": [height, width], "embed_dim": model.config.embed_dim,
                  "depth": model.config.depth, "num_heads": model.config.num_heads},
        "plan": current_plan(model).to_dict(),
        "last_block": "class-token" if model.class_token_block_active else "full",
        "macs": macs, "macs_unpruned": base, "macs_saving": 1 - macs / base,
        "params": sum(p.numel() for p in model.parameters()),
        "exporter": exporter_of(model),
        "runtime_versions": runtime_versions(),
        "parity": parity,
        "accuracy": {"dataset": dataset.name, "root": str(dataset.root),
                     "query_sets": {name: _accuracy_pair(reference[name], exported[name]) for name in reference}},
    }


def _precision_detail(request: ExportRequest) -> str:
    return {
        ("onnx", "fp32"): "float32 graph",
        ("onnx", "int8"): "ONNX Runtime static QDQ: MatMul/Gemm/Conv weights int8 per channel, activations uint8 "
                          "per tensor; norms and softmax float32",
        ("openvino", "fp32"): "float32 IR (compiled with INFERENCE_PRECISION_HINT f32)",
        ("openvino", "fp16"): "float16-compressed weights; a CPU decompresses them and computes in float32",
        ("openvino", "int8"): "NNCF post-training quantization (transformer preset, SmoothQuant)",
    }[(request.format, request.precision)]


def _unpruned_macs(model: ReIDViT) -> int:
    return count_macs(ReIDViT(model.config).eval()).total  # MACs do not depend on the weights


def _parity(model: ReIDViT, features, batch: int, evaluator: Evaluator) -> dict[str, Any]:
    name, images = next(iter(evaluator.query_images.items()))
    images = images[:PARITY_IMAGES]
    samples = evaluator.dataset.query_sets[name][:len(images)]
    camids = [s.camid for s in samples]
    needs_camids = model.sie_embed is not None
    exported = extract_fixed_batch_features(features, batch, images, camids, needs_camids)
    with torch.no_grad():
        reference = model(normalize(images), torch.as_tensor(camids) if needs_camids else None)
    return {"images": len(images), "query_set": name,
            "max_abs_diff": float((exported - reference).abs().max()),
            "min_cosine": float(torch.nn.functional.cosine_similarity(exported, reference, dim=1).min())}


def _accuracy_pair(reference, exported) -> dict[str, Any]:
    ours, theirs = reference.as_dict(), exported.as_dict()
    return {"queries": reference.num_queries, "pytorch": {k: ours[k] for k in ("rank1", "mAP")},
            "exported": {k: theirs[k] for k in ("rank1", "mAP")},
            "difference": {k: theirs[k] - ours[k] for k in ("rank1", "mAP")}}
