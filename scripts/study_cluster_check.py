"""The study on a local 2-worker Dask cluster against the serial run: same tables, a worker killed,
an interrupted study resumed. Writes results/study/<device-id>/check.json and the serial tables.

    python scripts/study_cluster_check.py [--profile equal-macs-quick] [--work /tmp/study-check]

Uses the embedded default model and synthetic set from the cache ($AMG_CACHE_DIR). Run it on an
otherwise idle machine: the timings are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from amg.benchmark.profiles import PROFILES, study_configurations
from amg.benchmark.study_folder import ACCURACY_CSV
from amg.benchmark.study_run import run_study, start_study
from amg.files import write_text_atomic
from amg.measure.device import device_id
from amg.train.cache import default_model, synthetic_root

REPO = Path(__file__).resolve().parent.parent


def study_command(folder: Path, profile: str, *engine: str) -> list[str]:
    return [sys.executable, "-m", "amg.cli", "study", "run", "--study", str(folder), "--profile", profile, *engine]


def timed_run(folder: Path, profile: str, *engine: str) -> float:
    start = time.perf_counter()
    subprocess.run(study_command(folder, profile, *engine), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def killed_worker_run(folder: Path, profile: str) -> dict:
    """The study on a local cluster whose worker running the first fine-tuning is SIGKILLed mid-way."""
    from distributed import Client, LocalCluster

    from amg.data.layout import load_dataset

    model, _ = default_model()
    dataset = load_dataset(synthetic_root())
    configs = study_configurations(PROFILES[profile])
    study = start_study(folder, model, dataset, configs)
    killed: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:

        def kill_a_fine_tuning() -> None:
            while not killed:
                for address, keys in client.processing().items():
                    tuned = [str(key) for key in keys if "@ft" in str(key)]
                    if tuned:
                        time.sleep(20)  # well into its fine-tuning
                        killed["pid"] = client.run(os.getpid, workers=[address])[address]
                        killed["task"] = tuned[0]
                        os.kill(killed["pid"], signal.SIGKILL)
                        return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_a_fine_tuning, daemon=True)
        killer.start()
        start = time.perf_counter()
        outcome = run_study(study, configs, dataset.root, threads=1, address=cluster.scheduler_address,
                            progress=lambda message: None)
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "killed_worker_pid": killed.get("pid"), "killed_task": killed.get("task"),
            "computed": len(outcome.computed), "failed": outcome.failed,
            "half_written_files": [str(p) for p in study.folder.rglob("*.tmp")]}


def interrupted_run(folder: Path, profile: str) -> dict:
    """SIGINT the 2-worker study once 4 configurations are finished, then run it again."""
    # a Ctrl-C: SIGINT as a terminal sends it (a background shell may have started us ignoring it)
    process = subprocess.Popen(study_command(folder, profile, "--workers", "2"), stdout=subprocess.DEVNULL,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rows = folder / "rows"
    while process.poll() is None and len(list(rows.glob("*.json"))) < 4:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    interrupted_at = time.perf_counter()
    process.wait()
    stopped_within = time.perf_counter() - interrupted_at
    finished = {path.name: path.stat().st_mtime_ns for path in rows.glob("*.json")}
    start = time.perf_counter()
    rerun = subprocess.run(study_command(folder, profile, "--workers", "2"), check=True, capture_output=True,
                           text=True)
    unchanged = all((rows / name).stat().st_mtime_ns == stamp for name, stamp in finished.items())
    return {"finished_before_interrupt": len(finished), "stopped_within_seconds": round(stopped_within, 1),
            "exit_status": process.returncode, "rerun_seconds": round(time.perf_counter() - start, 1),
            "rerun_summary": rerun.stdout.strip().splitlines()[-1], "finished_rows_untouched": unchanged}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="equal-macs-quick")
    parser.add_argument("--work", type=Path, default=Path("/tmp/study-check"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    default_model(), synthetic_root()  # cached before anything is timed
    serial = args.work / "serial"
    result = {"profile": args.profile, "configurations": len(study_configurations(PROFILES[args.profile])),
              "serial_seconds": round(timed_run(serial, args.profile), 1),
              "two_workers_seconds": round(timed_run(args.work / "two", args.profile, "--workers", "2"), 1)}
    result["killed"] = killed_worker_run(args.work / "killed", args.profile)
    result["interrupted"] = interrupted_run(args.work / "interrupted", args.profile)
    reference = (serial / ACCURACY_CSV).read_bytes()
    result["same_accuracy_csv_as_serial"] = {name: (args.work / name / ACCURACY_CSV).read_bytes() == reference
                                             for name in ("two", "killed", "interrupted")}
    out = REPO / "results" / "study" / device_id()
    out.mkdir(parents=True, exist_ok=True)
    for name in (ACCURACY_CSV, "accuracy.queries.json", "timings.csv"):
        shutil.copyfile(serial / name, out / name)
    shutil.copyfile(args.work / "two" / "timings.csv", out / "two-workers-timings.csv")
    write_text_atomic(out / "check.json", json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if all(result["same_accuracy_csv_as_serial"].values()) and not result["killed"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
