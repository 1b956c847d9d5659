"""Every backend the suite can run a model on, by name: what it is and what it supports.

Adding a backend is one entry here plus, in `amg.measure.backends`, the two functions it
names: `availability() -> str | None` (None: it runs here; else the reason it does not) and
`runner(model, batch: Batch) -> Compiled` (the model compiled for one input batch; `prepare`
checks its output against PyTorch before anything is timed).

Torch-free on purpose: the command line's choices, profiles and reports read it on a machine
that only collects CSVs.
"""

from __future__ import annotations

from dataclasses import dataclass

from amg.errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
AUTOCAST = ("fp32", "fp16", "bf16")  # what PyTorch runs by autocast


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    precisions: tuple[str, ...]  # what it runs (PyTorch: fp16/bf16 by autocast; runtimes: their own)
    availability: str  # function name in amg.measure.backends
    runner: str  # function name in amg.measure.backends
    gpu: bool = False  # reduced-precision cases run there by default
    eager: bool = True  # the model runs as a PyTorch module: its peak memory is measured in a child


_BACKENDS = (
    Backend("cpu", "PyTorch eager on the CPU", ("fp32", "bf16"), "always", "cpu_runner"),
    Backend("cuda", "PyTorch on an NVIDIA GPU (not a Jetson)", AUTOCAST, "cuda_availability", "cuda_runner",
            gpu=True),
    Backend("jetson", "PyTorch on a Jetson's integrated GPU", AUTOCAST, "jetson_availability", "cuda_runner",
            gpu=True),
    Backend("rpi", "PyTorch eager on a Raspberry Pi's CPU", ("fp32", "bf16"), "rpi_availability", "cpu_runner"),
    Backend("torchscript", "traced, frozen and optimised TorchScript on the CPU", ("fp32",), "always",
            "torchscript_runner", eager=False),
    Backend("inductor", "torch.compile (inductor) at static shapes: the GPU when there is one, else the CPU "
            "(needs a C++ compiler)", AUTOCAST, "inductor_availability", "inductor_runner", eager=False),
    Backend("onnxruntime", "the static-shape model exported to ONNX, run by ONNX Runtime on the CPU "
            "(int8: static QDQ quantization)", ("fp32", "int8"),
            "onnxruntime_availability", "onnx_runner", eager=False),
    Backend("tensorrt", "the static-shape ONNX export built into a TensorRT engine by ONNX Runtime's TensorRT "
            "provider (NVIDIA GPU or Jetson; fp16: TensorRT's half kernels)", ("fp32", "fp16"),
            "tensorrt_availability", "tensorrt_runner", gpu=True, eager=False),
    Backend("openvino", "the static-shape model exported to ONNX, compiled by OpenVINO for the CPU (x86, ARM; "
            "bf16: its precision hint, int8: NNCF quantization)", ("fp32", "bf16", "int8"), "openvino_availability", "openvino_runner", eager=False),
)
BACKENDS = {backend.name: backend for backend in _BACKENDS}
BACKEND_NAMES = tuple(BACKENDS)
GPU_BACKENDS = tuple(name for name, backend in BACKENDS.items() if backend.gpu)
EAGER_BACKENDS = tuple(name for name, backend in BACKENDS.items() if backend.eager)


def backend(name: str) -> Backend:
    """The backend `name`; a ValueError lists the choices."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]
