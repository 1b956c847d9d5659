"""Pruning plans kept on disk by configuration, so that every run measures the same pruned models.

Calibration scores come from gradients, and gradients differ in their last bits between CPU
models, thread counts and math-library code paths; near-ties between heads or K/V positions
then flip, and the "same" configuration keeps other heads (other accuracy, other MACs). A
plan made once and stored here takes that variation out of comparisons: CI measures the
committed plans, and a fleet of devices can measure the plans one workstation made.

One JSON file per configuration, `<folder>/<config_id>.json`, holding the configuration's
name, a fingerprint of the weights the plan was made for, the plan and its content hash. A
file made for other weights or another configuration, or whose plan was edited after it was
stored (its hash no longer matches), is refused with an error naming it, never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from amg.benchmark.results import safe_name
from amg.errors import InputError
from amg.files import write_text_atomic
from amg.model.config import ModelConfig
from amg.model.plan import PrunePlan

STORE_FORMAT = "amg-plan-store/1"


def plan_hash(plan: dict) -> str:
    """SHA-256 of a plan's canonical JSON: what a stored plan must still hash to when it is used."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class PlanStoreError(InputError):
    """A stored plan cannot be used for this model or configuration; names the file."""


@dataclass(frozen=True)
class PlanStore:
    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.folder.exists() and not self.folder.is_dir():
            raise PlanStoreError(f"plan folder {self.folder} exists and is not a folder")

    def path(self, config_id: str) -> Path:
        return self.folder / f"{safe_name(config_id)}.json"

    def load(self, config_id: str, model_config: ModelConfig, fingerprint: str) -> PrunePlan | None:
        """The stored plan of `config_id` for the model with weights `fingerprint`; None if not stored."""
        path = self.path(config_id)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or entry.get("format") != STORE_FORMAT:
                raise InputError(f"not a stored plan (format {STORE_FORMAT!r} expected)")
            stored_hash = entry.get("plan_sha256")
            if stored_hash != plan_hash(entry["plan"]):
                raise InputError("its plan was edited after it was stored (its content hash differs)"
                                 if stored_hash else "it has no content hash (stored by an older version)")
            plan = PrunePlan.from_dict(entry["plan"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PlanStoreError(f"cannot use stored plan {path}: {error}; delete it to plan again") from error
        if entry.get("config_id") != config_id:
            raise PlanStoreError(f"{path} holds the plan of {entry.get('config_id')!r}, not of {config_id!r}")
        if entry.get("model_fingerprint") != fingerprint:
            raise PlanStoreError(
                f"{path} was planned for other weights (fingerprint {entry.get('model_fingerprint')!r}, "
                f"this model {fingerprint!r}): delete it to plan again, or point to the plans of this model")
        try:
            plan.check_fits(model_config)
        except ValueError as error:
            raise PlanStoreError(f"{path}: {error}") from error
        return plan

    def save(self, config_id: str, plan: PrunePlan, fingerprint: str) -> Path:
        """Write the plan atomically (a reader never sees half a file; concurrent writers each land whole)."""
        path = self.path(config_id)
        stored = plan.to_dict()
        entry = {"format": STORE_FORMAT, "config_id": config_id, "model_fingerprint": fingerprint,
                 "plan": stored, "plan_sha256": plan_hash(stored)}
        text = json.dumps(entry, indent=1) + "\n"
        return write_text_atomic(path, text)
