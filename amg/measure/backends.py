"""Where a model runs: device detection, a stable device id, and each backend's availability
check and runner (the backends themselves are listed in `amg.measure.backend_registry`).

A Jetson is CUDA plus /etc/nv_tegra_release or a Jetson device-tree model; a Raspberry Pi is
a device-tree model naming one.

`prepare` returns a `Runner`: a zero-argument callable doing one forward pass on a fixed
input, plus the synchronisation to time it honestly. An unavailable backend raises
`BackendUnavailable` with the reason; the suite turns that into a pytest skip.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from amg.errors import InputError
from amg.measure.backend_registry import BACKENDS, PRECISIONS, backend
from amg.measure.device import is_jetson, is_raspberry_pi
from amg.measure.export import (
    calibration_feeds,
    example_inputs,
    export_onnx,
    input_names,
    model_inputs,
    onnxruntime_features,
    onnxruntime_session,
    openvino_compiled,
    openvino_features,
    openvino_model,
    quantize_onnx_int8,
)

OUTPUT_PARITY = 1e-4  # max |exported fp32 - PyTorch| on the features
MIN_COSINE = 0.9  # smallest per-image cosine of a reduced-precision output with fp32 PyTorch


class BackendUnavailable(RuntimeError):
    """This backend cannot run here; the message says why."""


def always() -> str | None:
    return None


def cuda_availability() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return "this is a Jetson: use the jetson backend" if is_jetson() else None


def jetson_availability() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not is_jetson():
        return "CUDA is present but this is not a Jetson (no /etc/nv_tegra_release or Jetson device tree)"
    return None


def rpi_availability() -> str | None:
    return None if is_raspberry_pi() else "the device tree does not name a Raspberry Pi"


def _installed(module: str, install: str) -> str | None:
    """None when `module` imports, else why the backend that needs it cannot run."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{module} is not installed ({install})"
    return None


def onnxruntime_availability() -> str | None:
    return _installed("onnxruntime", "pip install 'amg-bench[onnx]'")


def openvino_availability() -> str | None:
    return _installed("openvino", "pip install openvino")


def tensorrt_availability() -> str | None:
    reason = _installed("onnxruntime", "pip install onnxruntime-gpu")
    if reason:
        return reason
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return ("ONNX Runtime has no TensorrtExecutionProvider here (needs onnxruntime-gpu built with TensorRT, "
                "and TensorRT's libraries, on an NVIDIA GPU or Jetson)")
    return None


def inductor_availability() -> str | None:
    if torch.cuda.is_available() or shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++"):
        return None
    return "torch.compile's inductor needs a C++ compiler for the CPU (none found: install g++)"


def availability(name: str) -> str | None:
    """None when backend `name` can run here, else the reason it cannot."""
    return _FUNCTIONS[backend(name).availability]()


@dataclass
class Runner:
    """One forward pass on a fixed input; `synchronize` waits for asynchronous devices.

    `features` runs the same compiled model on other images of the same batch size (for the
    accuracy of what was timed); `output_max_diff` / `output_cosine` compare its output on
    the timing input with the fp32 PyTorch model's (the largest absolute difference, the
    smallest per-image cosine similarity)."""

    run: Callable[[], object]
    synchronize: Callable[[], None] | None
    torch_device: str
    note: str = ""
    features: Features | None = None
    batch: int = 0
    output_max_diff: float | None = None
    output_cosine: float | None = None

    def __call__(self) -> object:
        return self.run()


# normalised images [batch, 3, H, W] and camera ids (or None) -> features [batch, D] (on the runner's device)
Features = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class Compiled:
    """What a backend's runner function returns: the model compiled for one batch size."""

    features: Features
    synchronize: Callable[[], None] | None = None
    torch_device: str = "cpu"
    note: str = ""


def _torch_runner(model: torch.nn.Module, device: str, precision: str) -> Compiled:
    model = model.to(device).eval()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def features(images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        camids = camids.to(device) if camids is not None else None
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            return model(images, camids)

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return Compiled(features, sync, device)


def cpu_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    return _torch_runner(model, "cpu", batch.precision)


def cuda_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    return _torch_runner(model, "cuda", batch.precision)


def torchscript_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic: shapes are static here
        traced = torch.jit.trace(model.eval(), batch.inputs, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def features(images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return frozen(*model_inputs(images, camids))

    return Compiled(features, note="torch.jit.trace + freeze + optimize_for_inference")


def inductor_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    """torch.compile (inductor) at static shapes, on the GPU when there is one; `prepare`'s first
    call compiles it, so compilation is never timed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    eager = _torch_runner(compiled, device, batch.precision)
    return Compiled(eager.features, eager.synchronize, device, f"torch.compile inductor on {device}")


@dataclass(frozen=True)
class Batch:
    """The fixed input a runner is compiled for, its precision and threads, and the images
    (normalised) that INT8 quantization calibrates on."""

    images: torch.Tensor
    camids: torch.Tensor | None
    precision: str
    threads: int
    calibration: torch.Tensor | None = None

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return model_inputs(self.images, self.camids)


@contextlib.contextmanager
def _onnx_file(model: torch.nn.Module, batch: Batch, backend_name: str) -> Iterator[Path]:
    """The model exported to a temporary ONNX file (quantized for int8), for `backend_name`
    to load inside the block. A dynamic token policy that fails to export or load is
    unavailable there, with the reason; a static model that fails is a bug to see."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(model, batch.inputs, Path(folder) / "model.onnx")
            if batch.precision == "int8" and backend_name == "onnxruntime":
                path = quantize_onnx_int8(path, Path(folder) / "model.int8.onnx", _calibration_feeds(model, batch))
            yield path
    except Exception as error:
        dynamic = getattr(model, "dynamic_tokens", None)
        if dynamic is None:
            raise
        # Per-image token merging/dropping (gather/scatter on data-dependent indices) goes
        # through the dynamo exporter; should it fail, say so instead of timing nothing.
        raise BackendUnavailable(f"{backend_name}: the dynamic token policy {dynamic['policy']!r} does not "
                                 f"export to ONNX here ({type(error).__name__}: {str(error)[:160]})") from error


RANDOM_CALIBRATION_IMAGES = 32


def _calibration_feeds(model: torch.nn.Module, batch: Batch) -> list[dict]:
    images = batch.calibration
    if images is None:  # a model without data (random weights): seeded noise, said in the note
        count = max(RANDOM_CALIBRATION_IMAGES, len(batch.images))
        images = torch.randn(count, *batch.images.shape[1:], generator=torch.Generator().manual_seed(1))
    return calibration_feeds(input_names(model), images, len(batch.images))


def _calibration_note(batch: Batch) -> str:
    if batch.precision != "int8":
        return ""
    return " calibrated on random images" if batch.calibration is None else \
        f" calibrated on {len(batch.calibration)} images"


def onnx_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    with _onnx_file(model, batch, "onnxruntime") as path:
        session = onnxruntime_session(path, batch.threads)
    return Compiled(onnxruntime_features(session), note="ONNX Runtime" + _calibration_note(batch))


def tensorrt_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    """The ONNX export built into a TensorRT engine by ONNX Runtime's TensorRT provider (fp16:
    TensorRT's half-precision kernels); the engine is built by `prepare`'s first pass, untimed."""
    provider = ("TensorrtExecutionProvider", {"trt_fp16_enable": batch.precision == "fp16"})
    with _onnx_file(model, batch, "tensorrt") as path:
        session = onnxruntime_session(path, batch.threads, [provider, "CUDAExecutionProvider"])
    if session.get_providers()[0] != "TensorrtExecutionProvider":
        raise BackendUnavailable(f"tensorrt: ONNX Runtime fell back to {session.get_providers()[0]}")
    # host arrays in and out: the runner's device stays "cpu"
    return Compiled(onnxruntime_features(session), note=f"ONNX Runtime TensorRT provider {batch.precision}")


def openvino_runner(model: torch.nn.Module, batch: Batch) -> Compiled:
    reason = batch.precision == "int8" and _installed("nncf", "pip install nncf")
    if reason:
        raise BackendUnavailable(f"openvino int8: {reason}")
    with _onnx_file(model, batch, "openvino") as path:
        calibration = _calibration_feeds(model, batch) if batch.precision == "int8" else None
        compiled = openvino_compiled(openvino_model(path, batch.precision, calibration), batch.precision,
                                     batch.threads)
    note = {"int8": "OpenVINO INT8 by NNCF", "bf16": "OpenVINO bf16 hint"}.get(batch.precision, "OpenVINO f32 hint")
    return Compiled(openvino_features(compiled), note=note + _calibration_note(batch))


def _compare(compiled: Compiled, reference: torch.Tensor, batch: Batch, name: str,
             strict: bool) -> tuple[float, float]:
    """(max |output - fp32 PyTorch|, smallest per-image cosine) on the timing input. A `strict`
    backend at fp32 (a CPU export) must match to OUTPUT_PARITY; anything else (reduced
    precision, a GPU's TF32 kernels) must keep MIN_COSINE; otherwise nothing is timed."""
    with torch.no_grad():
        output = compiled.features(batch.images, batch.camids).float().cpu()
    gap = float((output - reference).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(output, reference, dim=1).min())
    if batch.precision == "fp32" and strict:
        if gap > OUTPUT_PARITY:
            raise RuntimeError(f"{name} output differs from PyTorch by {gap:.2e} (> {OUTPUT_PARITY}): not timing it")
    elif not cosine >= MIN_COSINE:
        raise BackendUnavailable(f"{name} {batch.precision}: its features no longer match fp32 PyTorch's (cosine "
                                 f"{cosine:.3f} < {MIN_COSINE}): not timing a model that computes something else")
    return gap, cosine


def prepare(name: str, model: torch.nn.Module, batch: int, precision: str = "fp32",
            threads: int | None = None, calibration: torch.Tensor | None = None, compare: bool = True) -> Runner:
    """A runner for `model` (a ReIDViT, possibly pruned) at `batch` on `backend`; INT8
    calibrates on `calibration` (normalised images; seeded noise when None). `compare`: check
    the output against fp32 PyTorch first (off where only memory is measured)."""
    spec = backend(name)
    reason = availability(name)
    if reason:
        raise BackendUnavailable(f"{name}: {reason}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision not in spec.precisions:
        raise BackendUnavailable(f"{name} runs {', '.join(spec.precisions)} here, not {precision}")
    images, camids = example_inputs(model, batch)
    fixed = Batch(images, camids, precision, threads or torch.get_num_threads(), calibration)
    if compare:
        with torch.no_grad():
            reference = model.eval()(*fixed.inputs).float()  # before a runner moves or converts the model
    compiled: Compiled = _FUNCTIONS[spec.runner](model, fixed)
    strict = not spec.eager and not spec.gpu and compiled.torch_device == "cpu"  # exported for the CPU
    gap, cosine = _compare(compiled, reference, fixed, name, strict) if compare else (None, None)
    device_images = images.to(compiled.torch_device)
    device_camids = camids.to(compiled.torch_device) if camids is not None else None
    note = compiled.note if gap is None else f"{compiled.note}; max |diff| {gap:.1e}, cosine {cosine:.5f}".lstrip("; ")
    return Runner(lambda: compiled.features(device_images, device_camids), compiled.synchronize,
                  compiled.torch_device, note, compiled.features, batch, gap, cosine)


def resolve(names: set[str]) -> dict[str, Callable]:
    """The functions the torch-free registry names (availability checks, runners) in this module:
    a function renamed here, or misspelt there, fails at import of this module, not when a run
    first reaches that backend."""
    missing = sorted(name for name in names if not callable(globals().get(name)))
    if missing:
        raise ImportError(f"amg.measure.backend_registry names functions amg.measure.backends does not have: {missing}")
    return {name: globals()[name] for name in names}


_FUNCTIONS = resolve({name for spec in BACKENDS.values() for name in (spec.availability, spec.runner)})
