"""The configuration-id language: a pruning configuration (`PruneSpec`) and its `config_id`,
the name CSV rows, plans, fine-tunings and the gate know it by (`PruneSpec.from_config_id`
reads one back; only names written as `config_id` writes them are read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from amg.errors import InputError
from amg.pruning.policies import SAVING_MODES, axis_policies, needs_calibration, peer_policy
from amg.pruning.schedule import ONE_SHOT, Schedule


@dataclass(frozen=True)
class PruneSpec:
    """A pruning configuration: by ratios (`heads`, `tokens`, `mlp` channels), or by a MACs
    `saving` that one shared ratio is searched for (`by` a mode of `SAVING_MODES`: heads,
    tokens, both, mlp or all), then a `schedule`."""

    heads: float = 0.0
    tokens: float = 0.0
    head_policy: str = "amg"
    token_policy: str = "amg"
    allocation: str = "global"
    saving: float = 0.0
    by: str = ""  # with `saving`: heads | tokens | both | mlp | all
    schedule: Schedule = ONE_SHOT
    seed: int = 0  # of the random policies: other seeds are other draws of the same method
    mlp: float = 0.0  # MLP hidden channels removed
    mlp_policy: str = "taylor"
    # the last block computed for the class token only (lossless; `ReIDViT.use_class_token_last_block`)
    class_token_block: bool = False

    def __post_init__(self) -> None:
        if self.seed and not self.random:
            raise InputError("a seed other than 0 names another draw of a random policy: this configuration has none")
        if bool(self.saving) != bool(self.by):
            raise InputError(f"a MACs saving needs `by` ({', '.join(SAVING_MODES)}), and `by` needs a saving")
        if self.by and self.by not in SAVING_MODES:
            raise InputError(f"`by` must be one of {', '.join(SAVING_MODES)}, got {self.by!r}")
        if self.saving and (self.heads or self.tokens or self.mlp):
            raise InputError("give ratios or a MACs saving, not both")
        peer_policy(self.axis_policies)

    @property
    def random(self) -> bool:
        """Whether a policy it uses draws at random (so its seed matters)."""
        return "random" in self.used_policies

    @property
    def axis_policies(self) -> dict[str, str]:
        """{axis: policy} of every axis it prunes (heads, tokens, MLP channels, in that order)."""
        return axis_policies(self.uses_heads, self.head_policy, self.uses_tokens, self.token_policy, self.uses_mlp,
                             self.mlp_policy)

    @property
    def used_policies(self) -> list[str]:
        """The policy of every axis it prunes (heads, tokens, MLP channels, in that order)."""
        return list(self.axis_policies.values())

    def _uses(self, axis: str, ratio: float) -> bool:
        return axis in SAVING_MODES.get(self.by, ()) if self.saving else ratio > 0

    @property
    def uses_heads(self) -> bool:
        return self._uses("heads", self.heads)

    @property
    def uses_tokens(self) -> bool:
        return self._uses("tokens", self.tokens)

    @property
    def uses_mlp(self) -> bool:
        return self._uses("mlp", self.mlp)

    @property
    def prunes(self) -> bool:
        """Whether it removes anything (the unpruned model fine-tuned does not)."""
        return self.uses_heads or self.uses_tokens or self.uses_mlp

    @property
    def needs_data(self) -> bool:
        return (needs_calibration(self.uses_heads, self.head_policy, self.uses_tokens, self.token_policy,
                                  self.uses_mlp, self.mlp_policy)
                or self.schedule != ONE_SHOT)

    @property
    def method(self) -> str:
        """What is pruned and by which policy, e.g. `heads0.5:amg/per-block+tokens0.5:amg`
        (without ratios when planned by a MACs saving: `heads:amg+tokens:amg`)."""
        heads = f"{self.heads:g}" if not self.saving else ""
        tokens = f"{self.tokens:g}" if not self.saving else ""
        mlp = f"{self.mlp:g}" if not self.saving else ""
        allocation = "" if self.allocation == "global" else f"/{self.allocation}"
        parts = []
        if self.uses_heads:
            parts.append(f"heads{heads}:{self.head_policy}{allocation}")
        if self.uses_tokens:
            parts.append(f"tokens{tokens}:{self.token_policy}")
        if self.uses_mlp:
            parts.append(f"mlp{mlp}:{self.mlp_policy}{'' if self.uses_heads else allocation}")
        if self.class_token_block:
            parts.append(CLASS_TOKEN_PART)
        return "+".join(parts) or "unpruned"

    @property
    def pruning(self) -> PruneSpec:
        """The same pruning with the full last block: what plans, fine-tunings and accuracy belong to
        (the class-token block changes neither the weights nor the features)."""
        return replace(self, class_token_block=False)

    @property
    def config_id(self) -> str:
        """e.g. `heads0.25:amg`, `heads0.5:amg/per-block+tokens0.5:amg`, `save0.3:heads:amg+tokens:amg@ft300`,
        `save0.2:heads:random~s2` (seed 2 of a random policy), `heads0.25:amg+cls-block` (with the
        class-token-only last block), `cls-block` (the unpruned model with it)."""
        name = f"save{self.saving:g}:{self.method}" if self.saving else self.method
        name = name if self.seed == 0 else f"{name}{SEED_MARK}{self.seed}"
        return name if self.schedule == ONE_SHOT else f"{name}@{self.schedule.label}"

    @classmethod
    def from_config_id(cls, config_id: str) -> PruneSpec | None:
        """The configuration `config_id` names, or None for a name this class does not write."""
        name, _, label = config_id.partition("@")
        fields: dict = {}
        if label:
            fields["schedule"] = Schedule.from_label(label)
            if fields["schedule"] is None:
                return None
        name, mark, seed = name.partition(SEED_MARK)
        if mark:
            if not seed.isdigit():
                return None
            fields["seed"] = int(seed)
        if name.startswith("save"):
            target, _, name = name[len("save"):].partition(":")
            fields["saving"] = target
        axes = []
        parts = [] if name == "unpruned" else name.split("+")
        if parts and parts[-1] == CLASS_TOKEN_PART:
            fields["class_token_block"] = True
            parts.pop()
        for part in parts:
            match = _METHOD_PART.match(part)
            if match is None:
                return None
            axes.append(match["axis"])
            if "saving" not in fields:
                fields[match["axis"]] = match["ratio"]
            fields[POLICY_FIELD[match["axis"]]] = match["policy"]
            if match["allocation"]:
                fields["allocation"] = match["allocation"]
        if "saving" in fields:
            fields["by"] = next((mode for mode, named in SAVING_MODES.items() if list(named) == axes), "?")
        try:
            spec = cls(**{k: float(v) if k in ("heads", "tokens", "mlp", "saving") else v for k, v in fields.items()})
        except ValueError:
            return None
        return spec if spec.config_id == config_id else None  # only names written as config_id writes them


SEED_MARK = "~s"
CLASS_TOKEN_PART = "cls-block"
_METHOD_PART = re.compile(r"^(?P<axis>heads|tokens|mlp)(?P<ratio>[0-9.]*):(?P<policy>[a-z-]+)(?:/(?P<allocation>[a-z-]+))?$")
POLICY_FIELD = {"heads": "head_policy", "tokens": "token_policy", "mlp": "mlp_policy"}


UNPRUNED = PruneSpec()
