"""The package's architecture holds: layers import only downwards (import-linter's contracts in
pyproject.toml), and reading CSVs (`amg report`, `amg select`, `amg gate`) never loads torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amg.benchmark.results import write_csv
from amg.model.dynamic import IMPLEMENTED
from amg.pruning import scores
from amg.pruning.peer import IMPORTANCE
from amg.pruning.policies import DYNAMIC_TOKEN_POLICIES, HEAD_POLICIES, MLP_POLICIES, TOKEN_POLICIES

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")
needs_linter = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


@needs_linter
def test_the_import_contracts_are_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@needs_linter
@pytest.mark.parametrize("module, forbidden", [
    ("amg/reporting/gate.py", "import torch"),  # a report that needs torch
    ("amg/model/vit.py", "from amg.pruning import planner"),  # a lower layer reaching up
    ("amg/measure/flops.py", "from amg.train import cache"),  # one sibling layer into the other
])
def test_the_contracts_fail_on_a_forbidden_import(tmp_path, module, forbidden):
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "amg", copy / "amg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    target = copy / module
    target.write_text(target.read_text() + f"\n{forbidden}  # noqa\n")
    result = _lint(copy)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def _without_torch(code: str, cwd: Path) -> None:
    """Run `code` in a fresh interpreter and fail if it loaded torch, timm or fvcore."""
    check = ("\nimport sys\nloaded = [m for m in ('torch', 'timm', 'fvcore') if m in sys.modules]\n"
             "assert not loaded, f'loaded {loaded}'\n")
    result = subprocess.run([sys.executable, "-c", code + check], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_report_select_and_gate_run_without_loading_torch(tmp_path):
    rows = [{"run_id": "r", "timestamp": "2026-11-25T00:00:00Z", "device_id": "board", "device_name": "board",
             "backend": "cpu", "precision": "fp32", "threads": 4, "batch": 1, "model": "small",
             "checkpoint": "default", "config_id": config, "macs": macs, "gmacs": macs / 1e9,
             "macs_saving": 1 - macs / 100, "latency_median_ms": 10.0 * macs / 100, "speedup": speedup,
             "query_mAP": 0.7, "occluded_mAP": 0.3}
            for config, macs, speedup in (("unpruned", 100, None), ("heads0.25:amg", 90, 1.1))]
    csv = write_csv(rows, tmp_path / "results", "board", "r")
    _without_torch(f"""
from amg.cli import main
assert main(['gate', '--baseline', {str(csv)!r}, '--current', {str(csv)!r}]) == 0
assert main(['report', '--results-dir', 'results', '--out', 'report']) == 0
assert main(['select', '--budget-ms', '20', '--backend', 'cpu', '--device-id', 'board',
             '--results-dir', 'results']) == 0
""", tmp_path)
    assert (tmp_path / "report" / "README.md").is_file()


def test_every_policy_has_its_scorer_its_dynamic_blocks_or_its_peer():
    for table in (HEAD_POLICIES, TOKEN_POLICIES, MLP_POLICIES):
        for policy in table.values():
            assert policy.dynamic or policy.peer or callable(getattr(scores, policy.scorer)), policy
    assert {p.name for p in HEAD_POLICIES.values() if p.peer} == set(IMPORTANCE)
    assert set(DYNAMIC_TOKEN_POLICIES) == set(IMPLEMENTED)


def test_every_name_a_registry_gives_resolves_at_import_and_a_wrong_one_fails_there():
    """The registries stay torch-free and name their functions by string; the torch-side modules
    resolve every name when imported, so a rename fails at once, not at a run's first use."""
    from amg.measure import backends
    from amg.measure.backend_registry import BACKENDS
    from amg.pruning import planner
    from amg.pruning.policies import HEAD_POLICIES, MLP_POLICIES, TOKEN_POLICIES, Policy

    assert set(backends._FUNCTIONS) == {name for spec in BACKENDS.values() for name in (spec.availability, spec.runner)}
    every_policy = [*HEAD_POLICIES.values(), *TOKEN_POLICIES.values(), *MLP_POLICIES.values()]
    assert set(planner._SCORERS) == {p.scorer for p in every_policy if p.scorer}
    with pytest.raises(ImportError, match=r"does not have: \['no_such_runner'\]"):
        backends.resolve({"cpu_runner", "no_such_runner"})
    with pytest.raises(ImportError, match=r"does not have: \['no_such_scores'\]"):
        planner.resolve_scorers([Policy("typo", "heads", "a misspelt scorer", scorer="no_such_scores")])
