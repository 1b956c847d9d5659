"""The deployable artifact: a ReIDViT exported to ONNX, optionally quantized to INT8, and
loaded by the runtime that serves it (ONNX Runtime, OpenVINO).

INT8 uses each runtime's own post-training quantization, calibrated on images the caller
gives (the calibration set's, normalised): ONNX Runtime's static QDQ quantization for ONNX
Runtime, NNCF (OpenVINO's compression framework) for OpenVINO. bf16 on OpenVINO is its
inference-precision hint; it is what OpenVINO silently runs on CPUs with bf16 units unless
told f32, so the f32 rows ask for f32 explicitly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from amg.errors import InputError

OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's lowest
FEATURES = "features"  # the output's name in every exported graph
INT8_OPS = ("MatMul", "Gemm", "Conv")  # what ONNX Runtime quantizes: the linear layers; norms and softmax stay float


INPUT_NAMES = ("images", "camids")  # a model without SIE has the first only: `feeds` stops there


def input_names(model: torch.nn.Module) -> list[str]:
    """The exported graph's inputs: images, plus camera ids for a model with SIE."""
    return list(INPUT_NAMES if getattr(model, "sie_embed", None) is not None else INPUT_NAMES[:1])


def model_inputs(images: torch.Tensor, camids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """A model's positional inputs: images, plus camera ids for a model with SIE."""
    return (images,) if camids is None else (images, camids)


def example_inputs(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Seeded random images for `model` and, with SIE, camera 0: what is traced, timed and compared on."""
    images = torch.randn(batch, 3, *model.config.img_size, generator=torch.Generator().manual_seed(0))
    return images, (torch.zeros(batch, dtype=torch.long) if getattr(model, "sie_embed", None) is not None else None)


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path,
                dynamic_batch: bool = False) -> Path:
    """`model` as ONNX at the shapes of `inputs`; the batch axis free if `dynamic_batch`.

    Static plans go through the TorchScript-based exporter (opset 17). Dynamic token policies
    (EViT, ToMe: per-image gather/scatter on data-dependent indices) go through the dynamo
    exporter (torch.export + onnxscript, opset 18), which expresses them."""
    path = Path(path)
    names = input_names(model)
    axes = {name: {0: "batch"} for name in names + [FEATURES]} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer notes
        torch.onnx.export(model.eval(), inputs, str(path), input_names=names, output_names=[FEATURES],
                          dynamic_axes=axes, dynamo=_dynamic(model), opset_version=exporter_of(model)["opset"],
                          verbose=False)
    return path


def _dynamic(model: torch.nn.Module) -> bool:
    return getattr(model, "dynamic_tokens", None) is not None


def exporter_of(model: torch.nn.Module) -> dict[str, Any]:
    """Which exporter `export_onnx` uses for `model`, and its opset (for manifests)."""
    if _dynamic(model):
        return {"name": "torch.onnx.export(dynamo=True): torch.export + onnxscript", "opset": max(OPSET, DYNAMO_OPSET)}
    return {"name": "torch.onnx.export (TorchScript-based)", "opset": OPSET}


def feeds(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.cpu().numpy() for name, tensor in zip(names, inputs)}


def onnxruntime_features(session):
    """The features function of an ONNX Runtime session: normalised images and camera ids in."""
    def features(images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        return torch.from_numpy(session.run(None, feeds(INPUT_NAMES, model_inputs(images, camids)))[0])

    return features


def openvino_features(compiled):
    """The features function of an OpenVINO compiled model (one infer request, reused)."""
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def features(images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        return torch.from_numpy(request.infer(feeds(INPUT_NAMES, model_inputs(images, camids)))[output].copy())

    return features


def calibration_feeds(names: Sequence[str], images: torch.Tensor, batch: int) -> list[dict[str, np.ndarray]]:
    """`images` (normalised, [N, 3, H, W]) cut into feeds of `batch` (a model with SIE sees camera 0)."""
    if len(images) < batch:
        raise InputError(f"INT8 calibration needs at least {batch} images (one batch), got {len(images)}")
    chunks = []
    for start in range(0, len(images) - batch + 1, batch):
        chunk = images[start:start + batch]
        chunks.append(feeds(names, (chunk, torch.zeros(batch, dtype=torch.long))[:len(names)]))
    return chunks


def quantize_onnx_int8(source: Path, target: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """ONNX Runtime static QDQ quantization of `source`'s linear layers (weights int8 per channel,
    activations uint8 per tensor), calibrated on `calibration` feeds."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(calibration)

        def get_next(self):
            return next(self.remaining, None)

    prepared = target.with_suffix(".pre.onnx")
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # the quantizer logs a line per weight it treats as a scalar
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(INT8_OPS))
    finally:
        logger.setLevel(level)
        prepared.unlink(missing_ok=True)
    return target


def onnxruntime_session(path: Path, threads: int, providers: list | None = None):
    """An ONNX Runtime session of `path`: the CPU provider unless `providers` says otherwise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Speed-ups alternate two sessions (unpruned, pruned): a session's pool keeps spinning
    # after its run and takes the cores from the other one, which read speed-ups of 0.5
    # to 2.4 for one plan here. Without spinning each pass has the cores to itself.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # the QDQ graph's notes on nodes it keeps on float
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def openvino_model(onnx_path: Path, precision: str, calibration: list[dict[str, np.ndarray]] | None = None):
    """The OpenVINO model of `onnx_path`, quantized by NNCF for int8."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    if precision != "int8":
        return model
    if not calibration:
        raise InputError("OpenVINO INT8 needs calibration images")
    import nncf

    return nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=sum(len(next(iter(feed.values()))) for feed in calibration))


# int8: the parts NNCF leaves in float run f32; fp16: half-precision weights, f32 compute on a CPU
OPENVINO_PRECISION_HINT = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32"}


def openvino_compiled(model, precision: str, threads: int):
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINT[precision]})


def runtime_versions() -> dict[str, str]:
    """Versions of the export and runtime packages installed here (absent ones left out)."""
    from importlib import metadata

    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def save_openvino(model, path: Path, precision: str) -> Path:
    """An OpenVINO IR (`.xml` + `.bin`); fp16 stores the weights in half precision."""
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=precision == "fp16")
    return path


def load_artifact(path: Path, precision: str, threads: int):
    """Features of a saved ONNX or OpenVINO artifact: a function of normalised images (any batch
    when exported with a free batch axis) and camera ids (None without SIE)."""
    if path.suffix == ".onnx":
        return onnxruntime_features(onnxruntime_session(path, threads))
    import openvino as ov

    return openvino_features(openvino_compiled(ov.Core().read_model(str(path)), precision, threads))
