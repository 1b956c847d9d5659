"""What the files of a study folder must hold: study.json and each configuration's row,
checked field by field when read (`amg.benchmark.study_folder` reads them).

A damaged or edited file is refused naming the file and the field, rather than failing later
with a KeyError, being split into one-letter configurations, or sending a device to a path
outside the study.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from amg.benchmark.config_ids import PruneSpec
from amg.errors import InputError

FORMAT = "amg-study/1"
DEVICES = ("cpu", "cuda")  # where a study's tasks run


class StudyError(InputError):
    """A study folder cannot be used as asked; the message names the folder and the problem."""



MANIFEST_FIELDS = ("format", "base_fingerprint", "data_identity", "data_name", "configurations")
ROW_FIX = "; delete it to compute the configuration again"
ROW_FIELDS = ("config_id", "seconds", "threads", "device", "worker")  # in every row (`run_task` writes them)
SKIPPED_FIELDS = ("skipped",)
MEASURED_FIELDS = ("accuracy", "queries")
MODEL_FIELDS = ("model", "model_sha256")  # a fine-tuned configuration's, beside MEASURED_FIELDS
ACCURACY_TEXT_COLUMNS = ("dataset", "accuracy_of")  # the rest of the accuracy columns are numbers
QUERY_VALUES = ("ap", "rank1")  # `query_record.per_query_values`
_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """`manifest` (study.json as parsed) if it is one, else StudyError naming `path` and the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StudyError(f"{path} is not a study manifest (a JSON object of format {FORMAT!r} expected)")
    _only_fields(manifest, path, MANIFEST_FIELDS)
    _field(manifest, path, "base_fingerprint", _is_text, "a non-empty string (the base weights' hash)")
    _field(manifest, path, "data_identity", _is_text, "a non-empty string (the data set's identity)")
    _field(manifest, path, "data_name", lambda value: isinstance(value, str), "a string")
    configurations = _field(manifest, path, "configurations", lambda value: isinstance(value, list),
                            "a list of configuration names")
    for index, name in enumerate(configurations):
        if not is_configuration(name):
            raise StudyError(f"{path}: field 'configurations' item {index} ({_shown(name)}) is not a configuration "
                             f"name (e.g. save0.2:heads:amg@ft300)")
    if len(set(configurations)) != len(configurations):
        twice = sorted({name for name in configurations if configurations.count(name) > 1})
        raise StudyError(f"{path}: field 'configurations' names {', '.join(twice)} more than once")
    return manifest


def validate_row(record: Any, path: Path, config_id: str, folder: Path) -> dict[str, Any]:
    """`record` (a row file of `config_id` in the study `folder`, as parsed) if it is one, else
    StudyError naming `path` and the field. A row is the configuration's result or why it was
    skipped; a fine-tuned configuration's also names its model file (inside the study's models/)
    and that file's SHA-256."""
    if not isinstance(record, dict):
        raise StudyError(f"{path} is not a study row (a JSON object expected, not {_shown(record)}){ROW_FIX}")
    if record.get("config_id") != config_id:
        raise StudyError(f"{path}: field 'config_id' must be {config_id!r} (the row's own name), "
                         f"not {_shown(record.get('config_id'))}{ROW_FIX}")
    skipped = "skipped" in record
    fine_tuned = not skipped and _is_fine_tuned(config_id)
    _only_fields(record, path, ROW_FIELDS + (SKIPPED_FIELDS if skipped else MEASURED_FIELDS)
                 + (MODEL_FIELDS if fine_tuned else ()), ROW_FIX)
    _field(record, path, "seconds", lambda value: _is_number(value) and value >= 0, "a number of seconds (>= 0)",
           ROW_FIX)
    _field(record, path, "threads", lambda value: _is_int(value) and value >= 1, "a thread count (>= 1)", ROW_FIX)
    _field(record, path, "device", lambda value: value in DEVICES, f"one of {', '.join(DEVICES)}", ROW_FIX)
    _field(record, path, "worker", _is_text, "a non-empty string (host:pid)", ROW_FIX)
    if skipped:
        _field(record, path, "skipped", _is_text, "a non-empty string (why it cannot be made)", ROW_FIX)
        return record
    _check_accuracy(_field(record, path, "accuracy", lambda value: isinstance(value, dict),
                           "an object of accuracy columns", ROW_FIX), path)
    _check_queries(_field(record, path, "queries", lambda value: isinstance(value, dict),
                          "an object of per-query values by query set", ROW_FIX), path)
    if fine_tuned:
        _check_model_path(_field(record, path, "model", _is_text, "the model file's path in the study", ROW_FIX),
                          path, folder)
        _field(record, path, "model_sha256", lambda value: isinstance(value, str) and _SHA256.fullmatch(value),
               "the model file's SHA-256 (64 hex digits)", ROW_FIX)
    return record


def _check_accuracy(accuracy: dict[str, Any], path: Path) -> None:
    """The accuracy columns a row's CSV line is made of: data set and label as text, metrics as numbers."""
    for column in ACCURACY_TEXT_COLUMNS:
        _field(accuracy, path, column, _is_text, "a non-empty string", ROW_FIX, within="accuracy")
    for column, value in accuracy.items():
        if column == "config_id":  # it would overwrite the row's own name in accuracy.csv
            raise StudyError(f"{path}: field 'accuracy' must not hold a 'config_id' column{ROW_FIX}")
        if column not in ACCURACY_TEXT_COLUMNS and not _is_number(value):
            raise StudyError(f"{path}: field 'accuracy.{column}' must be a number, not {_shown(value)}{ROW_FIX}")


def _check_queries(queries: dict[str, Any], path: Path) -> None:
    """{query set: {"ap": [numbers], "rank1": [0 or 1]}}, one value per valid query in both lists."""
    for name, values in queries.items():
        where = f"queries.{name}"
        if not isinstance(values, dict):
            raise StudyError(f"{path}: field {where!r} must be an object of {', '.join(QUERY_VALUES)}, "
                             f"not {_shown(values)}{ROW_FIX}")
        _only_fields(values, path, QUERY_VALUES, ROW_FIX, within=where)
        ap = _field(values, path, "ap", lambda value: isinstance(value, list) and all(map(_is_number, value)),
                    "a list of numbers", ROW_FIX, within=where)
        hits = _field(values, path, "rank1", lambda value: isinstance(value, list) and
                      all(_is_int(hit) and hit in (0, 1) for hit in value), "a list of 0 and 1", ROW_FIX, within=where)
        if len(ap) != len(hits):
            raise StudyError(f"{path}: field {where!r} holds {len(ap)} AP values but {len(hits)} Rank-1 hits{ROW_FIX}")


def _check_model_path(name: str, path: Path, folder: Path) -> None:
    """A row may name only a file in its study's models/: resolved (links and '..' followed), it must
    stay there, or a device would measure whatever file the row points to under its name."""
    study, models = folder.resolve(), (folder / "models").resolve()
    try:
        target = (folder / name).resolve()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a loop of links: no file of the study either way
        target = None
    if not name.endswith(".pt") or target is None or target.parent != models or not models.is_relative_to(study):
        raise StudyError(f"{path}: field 'model' ({name!r}) is not a model file in the study's models/ folder "
                         f"({models}): a study uses only its own files{ROW_FIX}")


def _field(payload: dict[str, Any], path: Path, name: str, valid: Callable[[Any], Any], expected: str,
           fix: str = "", within: str = "") -> Any:
    """payload[name], checked with `valid`; StudyError naming `path` and the field otherwise."""
    shown = f"{within}.{name}" if within else name
    if name not in payload:
        raise StudyError(f"{path}: field {shown!r} is missing{fix}")
    if not valid(payload[name]):
        raise StudyError(f"{path}: field {shown!r} must be {expected}, not {_shown(payload[name])}{fix}")
    return payload[name]


def _only_fields(payload: dict[str, Any], path: Path, known: Sequence[str], fix: str = "", within: str = "") -> None:
    """No field beyond `known`: an unknown one is damage or a misspelling, not something to ignore."""
    unknown = [name for name in payload if name not in known]
    if unknown:
        where = f" in {within!r}" if within else ""
        raise StudyError(f"{path}: unexpected field{'s' if len(unknown) > 1 else ''}{where} "
                         f"{', '.join(map(repr, unknown))} (expected {', '.join(known)}){fix}")


def _shown(value: Any) -> str:
    """A value as an error message names it: its JSON type and the start of its text."""
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    text = json.dumps(value)
    return f"{kinds.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_configuration(name: Any) -> bool:
    try:
        return isinstance(name, str) and PruneSpec.from_config_id(name) is not None
    except ValueError:  # a name malformed in a way the parser only notices late
        return False


def _is_fine_tuned(config_id: str) -> bool:
    """Whether `config_id`'s row must name a model file (a one-shot configuration is its plan applied)."""
    spec = PruneSpec.from_config_id(config_id)
    return spec is not None and spec.schedule.kind != "one-shot"
