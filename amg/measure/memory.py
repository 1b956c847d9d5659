"""Peak memory of one configuration, isolated in a fresh process.

A process's peak RSS only grows, and the benchmark process holds every other model, the
data and the test images; so each configuration runs in a child process that loads only
its model file, does warm-up and timed-size forward passes, and reports its own peaks:
CPU peak RSS (VmHWM on Linux, ru_maxrss elsewhere) and, on CUDA, max_memory_allocated
after a reset. `python -m amg.measure.memory MODEL_FILE --backend cpu --batch 1` is that
child; `measure_peak_memory` runs it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

FORWARD_PASSES = 3


@dataclass(frozen=True)
class MemoryPeak:
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    baseline_rss_mb: float  # RSS after imports and loading, before the first forward pass


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def _child(argv: Sequence[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m amg.measure.memory")
    parser.add_argument("model_file")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    from amg.measure.backends import prepare
    from amg.prune import load_pruned

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_pruned(args.model_file)
    baseline = _rss_peak_mb()
    runner = prepare(args.backend, model, args.batch, args.precision, args.threads)
    cuda = runner.torch_device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(FORWARD_PASSES):
        runner()
    if runner.synchronize:
        runner.synchronize()
    return {
        "peak_rss_mb": _rss_peak_mb(),
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "baseline_rss_mb": baseline,
    }


def measure_peak_memory(model_file: str | Path, backend: str = "cpu", batch: int = 1, precision: str = "fp32",
                        threads: int | None = None, timeout_s: float = 600) -> MemoryPeak:
    command = [sys.executable, "-m", "amg.measure.memory", str(model_file), "--backend", backend,
               "--batch", str(batch), "--precision", precision]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({' '.join(command)}):\n{done.stderr.strip()[-2000:]}")
    values = json.loads(done.stdout.strip().splitlines()[-1])
    return MemoryPeak(**values)


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1:])))
