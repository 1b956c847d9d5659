"""PrunePlan: which heads and key/value positions each block keeps (plain data, JSON).

A plan speaks of the *original* model: head numbers are those of the unpruned block, token
positions those of the unpruned sequence (0 is the class token, always kept). Applying a
plan makes a smaller dense model (physically sliced qkv/proj, static K/V index, or the
EViT/ToMe blocks), never a masked one. Plans are JSON: they can be read, diffed and applied
without calibration data. Applying one is `amg.model.pruned`; choosing one, `amg.pruning`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amg.errors import InputError
from amg.files import write_text_atomic
from amg.model.config import ModelConfig

PLAN_VERSION = 1


@dataclass
class PrunePlan:
    num_heads: int  # heads per block of the model the plan was made for
    num_tokens: int  # tokens (class token included) of that model
    kept_heads: list[list[int]]  # per block: original head numbers kept ([]: an emptied, MLP-only block)
    kept_tokens: list[list[int] | None]  # per block: K/V positions kept, None = all
    policy: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    # EViT / ToMe instead of static K/V pruning: {"policy": "evit"|"tome", "amount": ...}
    dynamic_tokens: dict[str, Any] | None = None
    version: int = PLAN_VERSION
    # per block: original MLP hidden channels kept, None = all (None for the whole list: no MLP pruning;
    # plans written before MLP pruning existed read so)
    kept_mlp: list[list[int] | None] | None = None

    @classmethod
    def unpruned(cls, config: ModelConfig) -> PrunePlan:
        return cls(config.num_heads, config.num_tokens, [list(range(config.num_heads))] * config.depth,
                   [None] * config.depth, {"heads": "none", "tokens": "none"}, {"heads": 0.0, "tokens": 0.0})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrunePlan:
        try:
            plan = cls(**values)
        except TypeError as error:
            raise InputError(f"not a PrunePlan: {error}") from error
        if plan.version != PLAN_VERSION:
            raise InputError(f"plan version {plan.version} is not supported (expected {PLAN_VERSION})")
        return plan

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not a JSON plan: {error}") from error

    def check_fits(self, config: ModelConfig) -> None:
        """Raise a ValueError naming the first mismatch between this plan and `config`."""
        problems = []
        if len(self.kept_heads) != config.depth or len(self.kept_tokens) != config.depth:
            problems.append(f"plan has {len(self.kept_heads)} blocks, model has {config.depth}")
        if self.num_heads != config.num_heads:
            problems.append(f"plan is for {self.num_heads} heads per block, model has {config.num_heads}")
        if self.num_tokens != config.num_tokens:
            problems.append(f"plan is for {self.num_tokens} tokens, model has {config.num_tokens}")
        for block, heads in enumerate(self.kept_heads):
            if not heads:  # an emptied block (as the reference may leave one) computes no K/V
                if self.kept_tokens[block:block + 1] not in ([], [None]):
                    problems.append(f"block {block} keeps no head, so it has no key/value positions to keep")
                if self.dynamic_tokens is not None:
                    problems.append(f"block {block} keeps no head: dynamic token policies (EViT, ToMe) "
                                    "read every block's attention")
            elif min(heads) < 0 or max(heads) >= config.num_heads or len(set(heads)) != len(heads):
                problems.append(f"block {block}: head numbers {heads} are not distinct numbers in [0, {config.num_heads})")
        for block, tokens in enumerate(self.kept_tokens):
            if tokens is None:
                continue
            if 0 not in tokens:
                problems.append(f"block {block}: the class token (position 0) must be kept")
            if min(tokens) < 0 or max(tokens) >= config.num_tokens or len(set(tokens)) != len(tokens):
                problems.append(f"block {block}: K/V positions are not distinct numbers in [0, {config.num_tokens})")
        if self.dynamic_tokens is not None and any(t is not None for t in self.kept_tokens):
            problems.append("a plan has either static K/V positions or a dynamic token policy, not both")
        problems += self._mlp_problems(config)
        if problems:
            raise InputError("plan does not fit the model: " + "; ".join(problems))

    def _mlp_problems(self, config: ModelConfig) -> list[str]:
        if self.kept_mlp is None:
            return []
        if len(self.kept_mlp) != config.depth:
            return [f"plan has MLP channels for {len(self.kept_mlp)} blocks, model has {config.depth}"]
        hidden = config.mlp_hidden
        return [f"block {block}: MLP channels are not at least one distinct number in [0, {hidden})"
                for block, channels in enumerate(self.kept_mlp) if channels is not None and (
                    not channels or min(channels) < 0 or max(channels) >= hidden or len(set(channels)) != len(channels))]

    def mlp_widths(self, config: ModelConfig) -> list[int]:
        """Hidden MLP channels per block under this plan."""
        kept = self.kept_mlp or [None] * config.depth
        return [config.mlp_hidden if channels is None else len(channels) for channels in kept]

    @property
    def heads_kept(self) -> int:
        return sum(len(h) for h in self.kept_heads)
