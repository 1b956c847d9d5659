"""A run's journal: the rows of a run in progress, on disk as each is measured, so that a
killed run still leaves its report (`recover_journals` turns it into an interrupted one).

A journal is `results/<device-id>/.<run-id>.journal`, one JSON row per line; beside it
`.<run-id>.journal.queries` holds each configuration's per-query values. A live run holds a
lock on its journal, so another run never recovers it from under it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from amg.benchmark.results import COLUMNS, INTERRUPTED, csv_cell, safe_name, write_csv
from amg.benchmark.row_checks import check_row
from amg.errors import InputError

JOURNAL_SUFFIX = ".journal"  # rows of a run in progress, one JSON line each: `.<run-id>.journal`
QUERIES_SUFFIX = ".queries"  # `.<run-id>.journal.queries`: {config_id: per-query values}, one line each


def journal_path(results_dir: str | Path, device: str, run_id: str) -> Path:
    """Where a run appends its rows as it measures them (hidden: not a report until it ends)."""
    return Path(results_dir) / safe_name(device) / f".{safe_name(run_id)}{JOURNAL_SUFFIX}"


def queries_journal(journal: Path) -> Path:
    """Beside a run's journal: the per-query values of each configuration it evaluated, one JSON
    line each, so that a killed run's report keeps its per-query record too."""
    return journal.with_name(journal.name + QUERIES_SUFFIX)


def append_journal(path: Path, row: Mapping[str, Any]) -> None:
    """Add one measured row (or one configuration's per-query values) to a journal, on disk
    before the next case starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: v for k, v in row.items() if not (isinstance(v, float) and not math.isfinite(v))})
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def claim_journal(path: Path) -> IO[str]:
    """Create the run's (empty) journal holding a lock on it, and return the handle to keep open
    while the run lives: another run's `recover_journals` leaves a locked journal alone. The lock
    dies with the process, so a killed run's journal is free to recover. The file appears under
    its name already locked (made under another name, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = path.with_name(path.name + ".claim")
    handle = open(claim, "a", encoding="utf-8")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(claim, path)
    return handle


DAMAGED_SUFFIX = ".damaged"  # a journal no report can be made of, set aside for a person to look at


def recover_journals(results_dir: str | Path, warn=None) -> list[Path]:
    """Turn the journals of runs that were killed (no CSV written) into interrupted reports;
    returns the reports written. A journal whose report exists is only removed; the journal of
    a run still measuring (locked: `claim_journal`) is left alone. A journal whose rows are not
    the suite's (not JSON objects, columns outside the schema, values out of their range) is
    renamed `<journal>.damaged` and `warn(message)` is called: one damaged file must not stop
    every later run on the folder."""
    written = []
    for journal in sorted(Path(results_dir).glob(f"*/.*{JOURNAL_SUFFIX}")):
        if not journal.is_file():
            continue  # not a journal this project wrote
        with open(journal, encoding="utf-8") as handle:
            try:  # held until the journal is gone, so that no run can claim it meanwhile
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            run_id = journal.name[1:-len(JOURNAL_SUFFIX)]
            if not (journal.parent / f"{run_id}.csv").exists():
                try:
                    rows = _journal_rows(handle.read(), journal)
                    if rows:
                        report = write_csv(rows, results_dir, journal.parent.name, run_id)
                        _recover_query_record(journal, report)
                        written.append(report)
                except (InputError, UnicodeDecodeError) as error:
                    aside = journal.with_name(journal.name + DAMAGED_SUFFIX)
                    os.replace(journal, aside)
                    if warn is not None:
                        warn(f"set aside a damaged journal as {aside}: {error}")
                    continue
            journal.unlink()
            queries_journal(journal).unlink(missing_ok=True)
    return written


def _recover_query_record(journal: Path, report: Path) -> None:
    """The per-query record of a killed run, from its queries journal (a torn last line is left out)."""
    from amg.benchmark.query_record import save_query_record  # (a sibling that never imports this module)

    path = queries_journal(journal)
    if not path.is_file():
        return
    values = {}
    for _, entry in _journal_lines(path.read_text(encoding="utf-8")):
        if isinstance(entry, dict):
            values.update({k: v for k, v in entry.items() if isinstance(v, dict)})
    if values:
        save_query_record(report, values)


def _journal_rows(text: str, journal: Path) -> list[dict[str, Any]]:
    """The rows of a killed run's journal, as an interrupted run's; InputError for rows that are not the suite's."""
    rows = []
    for number, row in _journal_lines(text):
        if not isinstance(row, dict):
            raise InputError(f"{journal} line {number} is not a row (a JSON object)")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise InputError(f"{journal} line {number} has columns outside the schema: {unknown}")
        row = {**row, "run_status": INTERRUPTED}
        check_row({column: csv_cell(value) for column, value in row.items()}, f"{journal} line {number}")
        rows.append(row)
    return rows


def _journal_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each line of a journal, up to the first that does not parse:
    the line being written when the run was killed."""
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            return
