"""Pruning schedules: one-shot, one-shot + fine-tuning, or iterative (prune, fine-tune, re-score).

All three start from the same one-shot plan (its ratios, its policies) and spend the same
number of fine-tuning steps (`Schedule.steps`), always distilled from the unpruned model, so
that they compare at equal training cost. Iterative spreads the steps over its rounds.
The schedule is a name and numbers (torch-free, for profiles and reports); running one is
`amg.pruning.iterative.run_schedule`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amg.errors import InputError

SCHEDULES = ("one-shot", "finetune", "iterative")
_LABEL = re.compile(r"^(?:one-shot|ft(?P<steps>\d+)|it(?P<rounds>\d+)x(?P<total>\d+))$")


@dataclass(frozen=True)
class Schedule:
    kind: str = "one-shot"
    steps: int = 0  # fine-tuning steps in all (0 for one-shot)
    rounds: int = 1  # head-pruning rounds (iterative only)
    lr: float = 2e-4

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise InputError(f"unknown schedule {self.kind!r}; choose one of {SCHEDULES}")
        if (self.kind == "one-shot") != (self.steps == 0) or self.steps < 0:
            raise InputError("one-shot takes no fine-tuning steps; finetune and iterative need steps >= 1")
        if self.rounds < 1 or (self.kind != "iterative" and self.rounds != 1):
            raise InputError("rounds must be 1, or >= 1 for the iterative schedule")

    @property
    def label(self) -> str:
        """Short and stable: part of configuration names (e.g. `ft300`, `it3x300`)."""
        return {"one-shot": "one-shot", "finetune": f"ft{self.steps}", "iterative": f"it{self.rounds}x{self.steps}"}[self.kind]

    @classmethod
    def from_label(cls, label: str) -> Schedule | None:
        """The schedule whose `label` this is (default learning rate), or None."""
        match = _LABEL.match(label)
        if match is None:
            return None
        try:
            if match["steps"]:
                return cls("finetune", int(match["steps"]))
            return cls("iterative", int(match["total"]), rounds=int(match["rounds"])) if match["total"] else cls()
        except ValueError:  # e.g. ft0
            return None

    @property
    def description(self) -> str:
        if self.kind == "one-shot":
            return "one-shot"
        if self.kind == "finetune":
            return f"one-shot + {self.steps} fine-tune steps, distilled"
        return f"iterative x{self.rounds}, {self.steps} fine-tune steps in all, distilled"


ONE_SHOT = Schedule()


def fine_tuning_stages(rounds: int, heads: bool, tokens: bool, mlp: bool = False) -> int:
    """How many fine-tuning stages share an iterative schedule's steps: one after each head
    round, one after the tokens, one after the MLP channels (at least one)."""
    return max(1, rounds * heads + tokens + mlp)
