"""The pruning ratio that saves a target share of a model's MACs: bisection over candidate plans
counted analytically (instant), shared by this project's policies and the peer's."""

from __future__ import annotations

from typing import Callable

from amg.errors import OutOfReach
from amg.measure.flops import count_macs, plan_macs
from amg.model.plan import PrunePlan
from amg.model.vit import ReIDViT


def plan_saving(model: ReIDViT) -> Callable[[PrunePlan], float]:
    """1 - MACs under a plan / MACs of `model` unpruned: the analytic block count plus the rest
    no plan changes (patch embedding, norms, neck), which fvcore counts once here."""
    blocks = plan_macs(model.config, PrunePlan.unpruned(model.config))
    rest = count_macs(model).total - blocks
    return lambda plan: 1 - (rest + plan_macs(model.config, plan)) / (rest + blocks)


def smallest_ratio(saving: Callable[[float], float], target: float, method: str, highest: float,
                   steps: int) -> float:
    """The smallest ratio in (0, `highest`] whose `saving` reaches `target`, to `highest` / 2^steps,
    by bisection; OutOfReach naming `method` when even `highest` falls short."""
    reachable = saving(highest)
    if reachable < target:
        raise OutOfReach(f"a {target:.0%} MACs saving is out of reach by {method}: at ratio {highest} "
                         f"the saving is {reachable:.1%}")
    low, high = 0.0, highest
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if saving(middle) < target else (low, middle)
    return high
