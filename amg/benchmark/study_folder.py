"""An accuracy study on disk: what `amg study run` makes once and every device's `pytest bench/` reads.

    <study>/study.json             base model's fingerprint, data set identity, configurations
    <study>/base.pt                the base model every configuration is pruned from
    <study>/plans/<config>.json    one-shot plans (`PlanStore`)
    <study>/models/<hash>.pt       fine-tuned models, named by their content (plan, schedule, data...)
    <study>/rows/<config>.json     one finished configuration: accuracy and per-query values, or why skipped
    <study>/accuracy.csv           every finished configuration's accuracy, in the study's order
    <study>/accuracy.queries.json  their per-query values (`amg.benchmark.query_record`)
    <study>/timings.csv            seconds per configuration and where it ran
    <study>/.driver.lock           held by the one `amg study run` driving the study (`hold_study`)

Every file is written atomically, one per configuration, so concurrent workers never mix
results and a killed study leaves finished configurations whole (a rerun goes on from them).
The whole folder can sit on a shared path, or be copied to a device.

Nothing read from the folder is trusted as it stands: study.json and every row are checked
field by field when read (`validate_manifest`, `validate_row`), a row's model path must stay
inside the study's models/, and a model file is used only when its bytes hash to what its row
recorded (`model_problem`): a file swapped or damaged since is refused, not measured under
the configuration's name.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from amg.benchmark.plan_store import PlanStore
from amg.benchmark.query_record import save_query_record
from amg.benchmark.results import safe_name
from amg.benchmark.study_files import (  # noqa: F401 (StudyError, FORMAT: the folder's API)
    FORMAT,
    ROW_FIX,
    StudyError,
    is_configuration,
    validate_manifest,
    validate_row,
)
from amg.errors import Unplannable
from amg.files import write_text_atomic

if TYPE_CHECKING:
    from amg.benchmark.pruned_models import AccuracyResult

MANIFEST = "study.json"
BASE_MODEL = "base.pt"
ACCURACY_CSV = "accuracy.csv"
TIMINGS_CSV = "timings.csv"
DRIVER_LOCK = ".driver.lock"
REJECTED_SUFFIX = ".rejected"  # a model file that failed its row's hash, set aside by a rerun


class NotInStudy(Unplannable):
    """A configuration the study did not compute (or skipped): a device measures it only with accuracy."""


@dataclass(frozen=True)
class StudyFolder:
    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    # -------------------------------------------------------------- making one
    @classmethod
    def create(cls, folder: str | Path, fingerprint: str, data_identity: str, data_name: str,
               configurations: Sequence[str], save_base: Any) -> StudyFolder:
        """A new study in `folder`, or the one already there when it was made for the same base
        weights and data (its configurations then grow by `configurations`). `save_base(path)`
        writes the base model (once)."""
        study = cls(folder)
        _check_study_place(study.folder)
        if unknown := [config for config in configurations if not is_configuration(config)]:
            raise StudyError(f"not configuration names: {', '.join(map(repr, unknown))} (e.g. save0.2:heads:amg@ft300)")
        manifest = study.manifest() if (study.folder / MANIFEST).is_file() else None
        if manifest is not None:
            for field_name, value in (("base_fingerprint", fingerprint), ("data_identity", data_identity)):
                if manifest[field_name] != value:
                    raise StudyError(
                        f"{study.folder} is a study of another {field_name.split('_')[0]} ({field_name} "
                        f"{manifest[field_name]!r}, this run's {value!r}): give another folder")
        known = list(manifest["configurations"]) if manifest else []
        known += [config for config in configurations if config not in known]
        study.folder.mkdir(parents=True, exist_ok=True)
        if not study.base_path.is_file():
            save_base(study.base_path)
        write_text_atomic(study.folder / MANIFEST, json.dumps(
            {"format": FORMAT, "base_fingerprint": fingerprint, "data_identity": data_identity,
             "data_name": data_name, "configurations": known}, indent=1) + "\n")
        return study

    # -------------------------------------------------------------- reading one
    @classmethod
    def open(cls, folder: str | Path) -> StudyFolder:
        study = cls(folder)
        study.manifest()
        return study

    def manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise StudyError(f"{self.folder} holds no study ({MANIFEST} missing): make one with `amg study run`") \
                from error
        except (OSError, ValueError) as error:
            raise StudyError(f"cannot read {path}: {error}") from error
        return validate_manifest(manifest, path)

    @property
    def base_path(self) -> Path:
        return self.folder / BASE_MODEL

    @property
    def plans(self) -> PlanStore:
        return PlanStore(self.folder / "plans")

    @property
    def models(self) -> Path:
        return self.folder / "models"

    @property
    def configurations(self) -> list[str]:
        return list(self.manifest()["configurations"])

    def check_base(self, fingerprint: str) -> None:
        expected = self.manifest()["base_fingerprint"]
        if fingerprint != expected:
            raise StudyError(f"the study {self.folder} was made for other base weights (fingerprint {expected!r}, "
                             f"this model {fingerprint!r}): measure its {BASE_MODEL}, or make a study of this model")

    def _row_path(self, config_id: str) -> Path:
        return self.folder / "rows" / f"{safe_name(config_id)}.json"

    def row(self, config_id: str) -> dict[str, Any] | None:
        """The finished configuration's record, or None if it is not finished."""
        path = self._row_path(config_id)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise StudyError(f"cannot read {path}: {error}{ROW_FIX}") from error
        return validate_row(record, path, config_id, self.folder)

    def finished(self, config_id: str) -> bool:
        return self._row_path(config_id).is_file()

    def missing(self, config_id: str) -> NotInStudy:
        return NotInStudy(f"{config_id} is not in the study {self.folder}: add it with `amg study run --study "
                          f"{self.folder} --configs {config_id}`")

    def check_member(self, config_id: str) -> dict[str, Any]:
        """The record of `config_id`; `NotInStudy` unless it was computed (with its reason when it was skipped)."""
        record = self.row(config_id)
        if record is None:
            raise self.missing(config_id)
        if record.get("skipped"):
            raise NotInStudy(f"{config_id}: {record['skipped']} (in the study {self.folder})")
        return record

    def model_path(self, config_id: str) -> Path:
        """The fine-tuned model file of `config_id`, checked to be the very file its row was written
        with: one swapped or damaged since would be measured under the configuration's name."""
        record = self.check_member(config_id)
        if "model" not in record:
            raise StudyError(f"the study {self.folder} lists {config_id} without a model file: it is not fine-tuned")
        if problem := self.model_problem(record):
            raise StudyError(f"the study {self.folder} lists {config_id} but {problem}: rerun `amg study run` "
                             f"on the study to compute it again")
        return self.folder / record["model"]

    def model_problem(self, record: dict[str, Any]) -> str | None:
        """Why the model file a (validated) row names cannot be used: missing, or its bytes not the ones
        the row recorded; None when it can be, or the row names none."""
        if "model" not in record:
            return None
        path = self.folder / record["model"]
        if not path.is_file():
            return f"its model file {path} is missing"
        if model_file_hash(path) != record["model_sha256"]:
            return (f"its model file {path} is not the one {self._row_path(record['config_id'])} was written with "
                    f"(its content hash differs)")
        return None

    def forget(self, record: dict[str, Any]) -> None:
        """Drop a finished configuration whose model file failed `model_problem`, so that it is
        computed again: the mismatched file is set aside first (a fine-tuning must not be taken
        from it; kept, renamed, for whoever looks into it), then the row goes."""
        if "model" in record and (path := self.folder / record["model"]).is_file():
            os.replace(path, path.with_name(path.name + REJECTED_SUFFIX))
        self._row_path(record["config_id"]).unlink(missing_ok=True)

    def accuracy(self, config_id: str) -> AccuracyResult:
        from amg.benchmark.pruned_models import AccuracyResult

        record = self.check_member(config_id)
        return AccuracyResult(dict(record["accuracy"]), record["queries"])

    # -------------------------------------------------------------- results
    def save_row(self, config_id: str, record: dict[str, Any]) -> Path:
        """One configuration's result, written whole (the last thing its task does)."""
        return write_text_atomic(self._row_path(config_id), json.dumps({"config_id": config_id, **record}) + "\n")

    def write_tables(self) -> Path:
        """accuracy.csv (+ per-query record) and timings.csv of every finished configuration, in the
        manifest's order: the same bytes whichever machines computed them, in whatever order."""
        records = [record for config in self.configurations if (record := self.row(config)) is not None]
        done = [record for record in records if not record.get("skipped")]
        accuracy_rows = [{"config_id": record["config_id"], **record["accuracy"]} for record in done]
        path = write_text_atomic(self.folder / ACCURACY_CSV, _csv_text(accuracy_rows))
        save_query_record(path, {record["config_id"]: record["queries"] for record in done})
        timings = [{"config_id": record["config_id"], "seconds": record.get("seconds"), "worker": record.get("worker"),
                    "threads": record.get("threads"), "skipped": record.get("skipped", "")} for record in records]
        write_text_atomic(self.folder / TIMINGS_CSV, _csv_text(timings))
        return path


def model_file_hash(path: Path) -> str:
    """SHA-256 of a model file's bytes: what a row records of the file it was measured with."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------- one driver at a time
@contextlib.contextmanager
def hold_study(folder: str | Path) -> Iterator[Path]:
    """Hold the study in `folder` for one driver (`amg study run`) from reading its manifest to
    writing its tables: two drivers with different configurations would each write study.json
    and the tables from their own view, and one's configurations would vanish. A second driver
    is refused at once, naming the folder. The lock is the kernel's (flock), so it dies with a
    killed driver; the lock file stays (removing it would let a third driver lock another file)."""
    folder = Path(folder)
    _check_study_place(folder)  # before a lock file lands in someone's folder that is no study
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / DRIVER_LOCK
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise StudyError(f"cannot open the study's lock file {lock}: {error}") from error
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another `amg study run` is driving the study {folder} (it holds {lock}): "
                             f"let it finish, then rerun (or give another folder)") from None
        yield folder
    finally:
        os.close(handle)  # releases the lock


def _check_study_place(folder: Path) -> None:
    """`folder` can take a study: new, empty, or one already (only the driver lock besides counts as empty)."""
    if folder.exists() and not folder.is_dir():
        raise StudyError(f"study folder {folder} exists and is not a folder")
    if folder.is_dir() and not (folder / MANIFEST).is_file() and \
            any(entry.name != DRIVER_LOCK for entry in folder.iterdir()):
        raise StudyError(f"{folder} is not empty and holds no {MANIFEST}: give an empty or new folder")


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
