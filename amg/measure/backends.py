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
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from amg.errors import InputError
from amg.measure.backend_registry import PRECISIONS, backend
from amg.measure.device import is_jetson, is_raspberry_pi

ONNX_PARITY = 1e-4  # max |onnxruntime - PyTorch| on the features; the bound
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


def availability(name: str) -> str | None:
    """None when backend `name` can run here, else the reason it cannot."""
    return globals()[backend(name).availability]()


@dataclass
class Runner:
    """One forward pass on a fixed input; `synchronize` waits for asynchronous devices."""

    run: Callable[[], object]
    synchronize: Callable[[], None] | None
    torch_device: str
    note: str = ""

    def __call__(self) -> object:
        return self.run()


def _torch_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None, device: str,
                  precision: str) -> Runner:
    model = model.to(device).eval()
    images = images.to(device)
    camids = camids.to(device) if camids is not None else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            return model(images, camids)

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return Runner(run, sync, device)


def cpu_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None, precision: str,
               threads: int) -> Runner:
    return _torch_runner(model, images, camids, "cpu", precision)


def cuda_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None, precision: str,
                threads: int) -> Runner:
    return _torch_runner(model, images, camids, "cuda", precision)


def torchscript_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None, precision: str,
                       threads: int) -> Runner:
    inputs = (images,) if camids is None else (images, camids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic: shapes are static here
        traced = torch.jit.trace(model.eval(), inputs, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return frozen(*inputs)

    return Runner(run, None, "cpu", "torch.jit.trace + freeze + optimize_for_inference")


@contextlib.contextmanager
def _onnx_file(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str],
               backend_name: str) -> Iterator[Path]:
    """The model exported to a temporary ONNX file, for `backend_name` to load inside the block.
    A dynamic token policy that fails to export or load is unavailable there, with the reason;
    a static model that fails is a bug to see."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            _export_onnx(model, inputs, names, path)
            yield path
    except Exception as error:
        dynamic = getattr(model, "dynamic_tokens", None)
        if dynamic is None:
            raise
        # Per-image token merging/dropping (gather/scatter on data-dependent indices) does
        # not survive the TorchScript-based exporter: say so instead of timing nothing.
        raise BackendUnavailable(f"{backend_name}: the dynamic token policy {dynamic['policy']!r} does not "
                                 f"export to ONNX here ({type(error).__name__}: {str(error)[:160]})") from error


def _export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    """The model as ONNX (opset 17, static shapes)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer notes
        torch.onnx.export(model.eval(), inputs, str(path), input_names=names,
                          output_names=["features"], dynamo=False, opset_version=17)


def _parity(output, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], runtime: str) -> float:
    """Max |runtime - PyTorch| on the features; above ONNX_PARITY nothing is timed."""
    import numpy as np

    with torch.no_grad():
        reference = model(*inputs).numpy()
    gap = float(np.abs(np.asarray(output) - reference).max())
    if gap > ONNX_PARITY:
        raise RuntimeError(f"{runtime} output differs from PyTorch by {gap:.2e} (> {ONNX_PARITY}): not timing it")
    return gap


def _exported_inputs(images: torch.Tensor, camids: torch.Tensor | None):
    inputs = (images,) if camids is None else (images, camids)
    names = ["images"] if camids is None else ["images", "camids"]
    return inputs, names, {name: tensor.numpy() for name, tensor in zip(names, inputs)}


def onnx_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None, precision: str,
                threads: int) -> Runner:
    import onnxruntime as ort

    inputs, names, feeds = _exported_inputs(images, camids)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Speed-ups alternate two sessions (unpruned, pruned): a session's pool keeps spinning
    # after its run and takes the cores from the other one, which read speed-ups of 0.5
    # to 2.4 for one plan here. Without spinning each pass has the cores to itself.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with _onnx_file(model, inputs, names, "onnxruntime") as path:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    gap = _parity(session.run(None, feeds)[0], model, inputs, "onnxruntime")
    return Runner(lambda: session.run(None, feeds), None, "cpu", f"ONNX Runtime parity {gap:.1e}")


def openvino_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None, precision: str,
                    threads: int) -> Runner:
    import openvino as ov

    inputs, names, feeds = _exported_inputs(images, camids)
    core = ov.Core()
    with _onnx_file(model, inputs, names, "openvino") as path:
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise run bf16 and fail parity
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    gap = _parity(request.infer(feeds)[output], model, inputs, "openvino")
    return Runner(lambda: request.infer(feeds)[output], None, "cpu", f"OpenVINO parity {gap:.1e}")


def prepare(name: str, model: torch.nn.Module, batch: int, precision: str = "fp32",
            threads: int | None = None) -> Runner:
    """A runner for `model` (a ReIDViT, possibly pruned) at `batch` on `backend`."""
    spec = backend(name)
    reason = availability(name)
    if reason:
        raise BackendUnavailable(f"{name}: {reason}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision not in spec.precisions:
        raise BackendUnavailable(f"{name} runs {', '.join(spec.precisions)} here, not {precision}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *model.config.img_size, generator=generator)
    camids = torch.zeros(batch, dtype=torch.long) if model.sie_embed is not None else None
    return globals()[spec.runner](model, images, camids, precision, threads or torch.get_num_threads())
