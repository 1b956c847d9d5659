"""Where a model runs: device detection, a stable device id, and one runner per backend.

Backends:
  cpu          PyTorch eager on the CPU (always available)
  cuda         PyTorch on an NVIDIA GPU (not a Jetson)
  jetson       PyTorch on a Jetson's integrated GPU (CUDA + /etc/nv_tegra_release or a Jetson
               device-tree model)
  rpi          PyTorch eager on a Raspberry Pi's CPU (device-tree model names a Raspberry Pi)
  torchscript  traced, frozen and optimised TorchScript on the CPU (a deployment path)
  onnxruntime  the static-shape model exported to ONNX, run by ONNX Runtime on the CPU

`prepare` returns a `Runner`: a zero-argument callable doing one forward pass on a fixed
input, plus the synchronisation to time it honestly. An unavailable backend raises
`BackendUnavailable` with the reason; the suite turns that into a pytest skip.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BACKENDS = ("cpu", "cuda", "jetson", "rpi", "torchscript", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "bf16")
ONNX_PARITY = 1e-4  # max |onnxruntime - PyTorch| on the features; the bound
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


class BackendUnavailable(RuntimeError):
    """This backend cannot run here; the message says why."""


def _device_tree_model() -> str:
    try:
        return DEVICE_TREE_MODEL.read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        return ""


def is_jetson() -> bool:
    return TEGRA_RELEASE.exists() or "jetson" in _device_tree_model().lower()


def is_raspberry_pi() -> bool:
    return "raspberry pi" in _device_tree_model().lower()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """What a person would call this machine: the board, the GPU, or the CPU."""
    board = _device_tree_model()
    if board:
        return board
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} + {cpu_name()}"
    return cpu_name()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_id() -> str:
    """Stable and file-system safe: architecture, board/GPU/CPU model, core count.

    `$AMG_DEVICE_ID` overrides it (e.g. to keep two identical boards apart).
    """
    override = os.environ.get("AMG_DEVICE_ID")
    if override:
        return _slug(override) or "device"
    parts = [platform.machine().lower() or "unknown"]
    board = _device_tree_model()
    if board:
        parts.append(_slug(board))
    elif torch.cuda.is_available():
        parts.append(_slug(torch.cuda.get_device_name(0)))
    else:
        parts.append(_slug(cpu_name()))
    parts.append(f"{os.cpu_count() or 0}c")
    return "-".join(p for p in parts if p)[:80]


def availability(backend: str) -> str | None:
    """None when `backend` can run here, else the reason it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend in ("cpu", "torchscript"):
        return None
    if backend in ("cuda", "jetson"):
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if backend == "jetson" and not is_jetson():
            return "CUDA is present but this is not a Jetson (no /etc/nv_tegra_release or Jetson device tree)"
        if backend == "cuda" and is_jetson():
            return "this is a Jetson: use the jetson backend"
        return None
    if backend == "rpi":
        return None if is_raspberry_pi() else "the device tree does not name a Raspberry Pi"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'amg-bench[onnx]')"
    return None


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
    if dtype is not None and device == "cpu" and dtype == torch.float16:
        raise BackendUnavailable("fp16 autocast is not supported on the CPU backend here; use bf16 or fp32")

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            return model(images, camids)

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return Runner(run, sync, device)


def _torchscript_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None) -> Runner:
    inputs = (images,) if camids is None else (images, camids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic: shapes are static here
        traced = torch.jit.trace(model.eval(), inputs, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return frozen(*inputs)

    return Runner(run, None, "cpu", "torch.jit.trace + freeze + optimize_for_inference")


def _onnx_runner(model: torch.nn.Module, images: torch.Tensor, camids: torch.Tensor | None,
                 threads: int) -> Runner:
    import numpy as np
    import onnxruntime as ort

    inputs = (images,) if camids is None else (images, camids)
    names = ["images"] if camids is None else ["images", "camids"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # exporter deprecation and tracer notes
                torch.onnx.export(model.eval(), inputs, str(path), input_names=names,
                                  output_names=["features"], dynamo=False, opset_version=17)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            dynamic = getattr(model, "dynamic_tokens", None)
            if dynamic is None:
                raise  # a static-shape model must export: a failure here is a bug to see
            # Per-image token merging/dropping (gather/scatter on data-dependent indices) does
            # not survive the TorchScript-based exporter: say so instead of timing nothing.
            raise BackendUnavailable(f"onnxruntime: the dynamic token policy {dynamic['policy']!r} does not "
                                     f"export to ONNX here ({type(error).__name__}: {str(error)[:160]})") from error
    feeds = {name: tensor.numpy() for name, tensor in zip(names, inputs)}
    with torch.no_grad():
        reference = model(*inputs).numpy()
    output = session.run(None, feeds)[0]
    gap = float(np.abs(output - reference).max())
    if gap > ONNX_PARITY:
        raise RuntimeError(f"onnxruntime output differs from PyTorch by {gap:.2e} (> {ONNX_PARITY}): not timing it")
    return Runner(lambda: session.run(None, feeds), None, "cpu", f"ONNX Runtime parity {gap:.1e}")


def prepare(backend: str, model: torch.nn.Module, batch: int, precision: str = "fp32",
            threads: int | None = None) -> Runner:
    """A runner for `model` (a ReIDViT, possibly pruned) at `batch` on `backend`."""
    reason = availability(backend)
    if reason:
        raise BackendUnavailable(f"{backend}: {reason}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision != "fp32" and backend in ("torchscript", "onnxruntime"):
        raise BackendUnavailable(f"{backend} runs fp32 here")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *model.config.img_size, generator=generator)
    camids = torch.zeros(batch, dtype=torch.long) if model.sie_embed is not None else None
    if backend in ("cpu", "rpi"):
        return _torch_runner(model, images, camids, "cpu", precision)
    if backend in ("cuda", "jetson"):
        return _torch_runner(model, images, camids, "cuda", precision)
    if backend == "torchscript":
        return _torchscript_runner(model, images, camids)
    return _onnx_runner(model, images, camids, threads or torch.get_num_threads())
