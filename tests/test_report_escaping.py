"""`amg report` writes every CSV-derived string escaped: no HTML, link, image or code span can
come out of a CSV's cells or a file's name, whichever column holds it (on committed runs
that fill every section: runtimes, reduced precision, equal MACs)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

from amg.benchmark.results import COLUMNS, csv_text
from amg.benchmark.row_checks import CHOICES, NUMBER_RULES
from amg.reporting.report import build_report
from amg.reporting.tables import Markdown, markdown_table, markdown_text

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "x86_64-amd-epyc-2c"
RUNS = ["20261128T105442Z-d444ae.csv",  # int8 and bf16 next to fp32, on three backends
        "20261128T132012Z-78ac80.csv"]  # an equal-MACs study
TEXT_COLUMNS = [c for c in COLUMNS if c not in NUMBER_RULES and c not in CHOICES]
# Columns the report groups or matches by: each one alone, so the others keep the sections filled
STRUCTURAL = ["config_id", "backend", "precision", "device_id", "model"]


def _payload(column: str) -> str:
    return f"<img src=x onerror=alert('{column}')>`</script><script>x()</script>|[link](http://x)!"


def _rows(name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((COMMITTED / name).read_text())))


def _report(tmp_path: Path, columns: list[str], file_name: str = "run.csv") -> str:
    for index, name in enumerate(RUNS):
        rows = _rows(name)
        for row in rows:
            row.update({column: _payload(column) for column in columns})
        folder = tmp_path / "results" / f"device{index}"
        folder.mkdir(parents=True)
        (folder / file_name.replace("run", f"run{index}")).write_text(csv_text(rows))
    build_report(tmp_path / "results", tmp_path / "report")
    return (tmp_path / "report" / "README.md").read_text()


def _unsafe(text: str) -> list[str]:
    """Raw HTML tags, links, images or backticks that did not come from this project's own text."""
    return re.findall(r"(?<!\\)<(?:img|script|/script)|(?<!\\)\[link(?<!\\)\]\(|(?<!\\)`</script", text)


def test_every_text_column_at_once_is_escaped_everywhere(tmp_path):
    text = _report(tmp_path, [c for c in TEXT_COLUMNS if c not in STRUCTURAL])
    assert "onerror" in text  # the payload reached the page (the test would pass vacuously otherwise)
    assert not _unsafe(text)


@pytest.mark.parametrize("column", STRUCTURAL)
def test_each_grouping_column_is_escaped(tmp_path, column):
    text = _report(tmp_path, [column])
    assert f"alert('{column}')" in text
    assert not _unsafe(text), column


def test_a_file_name_cannot_break_out_of_the_page(tmp_path):
    text = _report(tmp_path, [], file_name="run`<img src=x onerror=y>`.csv")
    assert "onerror=y" in text and not re.search(r"(?<!\\)<img", text)


def test_escaping_is_done_once_whoever_calls_it():
    once = markdown_text("<b>|")
    assert once == "\\<b\\>\\|" and markdown_text(once) == once and isinstance(once, Markdown)
    table = markdown_table([["<i>", Markdown("1.20 [1.10, 1.30]")]], ["<h>", "speed-up"], numeric_from=1)
    assert "\\<i\\>" in table and "\\<h\\>" in table and "1.20 [1.10, 1.30]" in table
