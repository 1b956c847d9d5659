"""Which device this is: its name and a stable, file-system safe id (torch-free: `amg select`
finds this device's measurements on a machine without torch)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


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


def gpu_name() -> str:
    """The first NVIDIA GPU's model as its driver reports it (what torch.cuda.get_device_name
    says), or "" without one. Read from the driver, so that naming a device needs no torch."""
    for info in sorted(NVIDIA_GPUS.glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return ""


def device_name() -> str:
    """What a person would call this machine: the board, the GPU, or the CPU."""
    board = _device_tree_model()
    if board:
        return board
    gpu = gpu_name()
    return f"{gpu} + {cpu_name()}" if gpu else cpu_name()


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
    elif gpu_name():
        parts.append(_slug(gpu_name()))
    else:
        parts.append(_slug(cpu_name()))
    parts.append(f"{os.cpu_count() or 0}c")
    return "-".join(p for p in parts if p)[:80]


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes, this one's threads included); None where
    the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
