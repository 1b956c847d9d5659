"""Peak memory of one configuration, isolated in a fresh process.

A process's peak RSS only grows, and the benchmark process holds every other model, the
data and the test images; so each configuration runs in a child process that loads only
its model file, does a few forward passes, and reports its own peaks: CPU peak RSS
(VmHWM on Linux, ru_maxrss elsewhere) and, on CUDA, max_memory_allocated after a reset.

Children fork from a forkserver that has already imported torch and amg (one child per
measurement, `max_tasks_per_child=1`): a fresh process each time, as if started anew,
without paying the seconds of imports every time. Where forkserver is missing (Windows)
they are spawned. `python -m amg.measure.memory MODEL_FILE` runs one by hand.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from amg.errors import InputError
from amg.measure.parent_death import die_with_parent

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


def _measure_here(model_file: str, backend: str, batch: int, precision: str, threads: int | None) -> dict:
    """Runs inside the child process."""
    import torch

    from amg.measure.backends import prepare
    from amg.model.pruned import load_pruned

    if threads:
        torch.set_num_threads(threads)
    model = load_pruned(model_file)
    baseline = _rss_peak_mb()
    runner = prepare(backend, model, batch, precision, threads, compare=False)
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


_executor: ProcessPoolExecutor | None = None


def _pool() -> ProcessPoolExecutor:
    global _executor
    if _executor is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            # the guard first: the forkserver dies with the benchmark even if it is killed
            context.set_forkserver_preload(["amg.measure.forkserver_guard", "torch", "timm", "amg.model.pruned",
                                            "amg.measure.backends"])
        else:
            context = multiprocessing.get_context("spawn")
        _executor = ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1,
                                        initializer=die_with_parent)
        atexit.register(_executor.shutdown)
    return _executor


def measure_peak_memory(model_file: str | Path, backend: str = "cpu", batch: int = 1, precision: str = "fp32",
                        threads: int | None = None, timeout_s: float = 600) -> MemoryPeak:
    if not Path(model_file).is_file():
        raise InputError(f"memory measurement failed: model file not found: {model_file}")
    future = _pool().submit(_measure_here, str(model_file), backend, batch, precision, threads)
    try:
        return MemoryPeak(**future.result(timeout=timeout_s))
    except Exception as error:  # the child's error, re-raised here: name what was measured
        if isinstance(error, BrokenProcessPool):  # a crashed child breaks the pool: start anew next time
            global _executor
            _executor = None
        raise RuntimeError(f"memory measurement failed for {model_file} ({backend}, batch {batch}): {error}") from error


def _main(argv: Sequence[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m amg.measure.memory")
    parser.add_argument("model_file")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    return _measure_here(args.model_file, args.backend, args.batch, args.precision, args.threads)


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1:])))
