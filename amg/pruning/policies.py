"""Every pruning policy, by name: what it prunes, what it needs, and which function scores it.

Adding a policy is one entry here plus its scorer in `amg.pruning.scores`, with the signature
`scorer(model, calibration, allocation, seed) -> list[Tensor]`: per block, one score per head
(higher = removed first) or per key/value position (higher = kept). Dynamic token policies
(EViT, ToMe) have no scorer: their blocks (`amg.model.dynamic`) choose tokens at run time.
Peer policies (Torch-Pruning's) have no scorer either: the peer library chooses heads and MLP
channels together, in one pass (`amg.pruning.peer`).

Torch-free on purpose: profiles, the command line's choices and the reports read it on a
machine that only collects CSVs.
"""

from __future__ import annotations

from dataclasses import dataclass

from amg.errors import InputError

HEADS, TOKENS, MLP = "heads", "tokens", "mlp"
# "global" is the reference's: one ranking over all blocks, which may empty a block;
# "keep-one" is the same ranking with one head kept in every block (this project's earlier rule).
REFERENCE_ALLOCATION = "global"
HEAD_ALLOCATIONS = (REFERENCE_ALLOCATION, "keep-one", "per-block", "normalized")
# What a MACs target may be reached by: each mode names the axes it prunes, at one shared ratio.
SAVING_MODES = {"heads": (HEADS,), "tokens": (TOKENS,), "both": (HEADS, TOKENS), "mlp": (MLP,),
                "heads-mlp": (HEADS, MLP), "all": (HEADS, TOKENS, MLP)}
# Calibration images per batch: the reference's 32. AMG's token score adds |mean A x dL/dA| per
# batch, so the batch size is part of the method, not only of the speed.
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Policy:
    name: str
    axis: str  # HEADS, TOKENS or MLP
    summary: str
    needs_data: bool = False  # scored on calibration images
    gradients: bool = False  # ...with a backward pass
    scorer: str | None = None  # function name in amg.pruning.scores; None: dynamic token policy or peer
    peer: str | None = None  # the library that plans heads and MLP channels together (amg.pruning.peer)

    @property
    def dynamic(self) -> bool:
        return self.scorer is None and self.peer is None


TORCH_PRUNING = "torch-pruning"
_PEER_POLICIES = (
    ("tp-taylor", "Torch-Pruning: Group-Taylor importance |w x dL/dw| of heads and MLP channels, one global "
                  "ranking", True),
    ("tp-magnitude", "Torch-Pruning: group L2 magnitude of heads and MLP channels, one global ranking", False),
)

_POLICIES = (
    Policy("amg", HEADS, "AMG: heads with the highest attention-map entropy go", needs_data=True,
           scorer="amg_head_removal_scores"),
    Policy("amg-lowest", HEADS, "the opposite rule: the most focused heads go", needs_data=True,
           scorer="lowest_entropy_removal_scores"),
    Policy("random", HEADS, "random heads go", scorer="random_removal_scores"),
    Policy("magnitude", HEADS, "heads with the smallest qkv/proj weight norm go", scorer="magnitude_removal_scores"),
    Policy("gradient", HEADS, "Taylor importance |sum(head output x gradient)| (Michel et al. 2019)",
           needs_data=True, gradients=True, scorer="gradient_removal_scores"),
    Policy("amg", TOKENS, "AMG: key/value positions with the lowest |sum attention x gradient| go",
           needs_data=True, gradients=True, scorer="amg_token_keep_scores"),
    Policy("random", TOKENS, "random key/value positions go", scorer="random_token_keep_scores"),
    Policy("evit", TOKENS, "EViT: keep the most class-attended tokens at 1/4, 1/2, 3/4 depth, fuse the rest"),
    Policy("tome", TOKENS, "ToMe: merge the most similar tokens in every block"),
    Policy("taylor", MLP, "first-order Taylor: MLP channels with the lowest |sum(activation x gradient)| go",
           needs_data=True, gradients=True, scorer="taylor_channel_keep_scores"),
    Policy("magnitude", MLP, "MLP channels with the smallest |fc1 row| x |fc2 column| go",
           scorer="magnitude_channel_keep_scores"),
    Policy("random", MLP, "random MLP channels go", scorer="random_channel_keep_scores"),
    *(Policy(name, axis, summary, needs_data=gradients, gradients=gradients, peer=TORCH_PRUNING)
      for name, summary, gradients in _PEER_POLICIES for axis in (HEADS, MLP)),
)
HEAD_POLICIES = {p.name: p for p in _POLICIES if p.axis == HEADS}
TOKEN_POLICIES = {p.name: p for p in _POLICIES if p.axis == TOKENS}
MLP_POLICIES = {p.name: p for p in _POLICIES if p.axis == MLP}
_BY_AXIS = {HEADS: HEAD_POLICIES, TOKENS: TOKEN_POLICIES, MLP: MLP_POLICIES}
STATIC_TOKEN_POLICIES = tuple(name for name, p in TOKEN_POLICIES.items() if not p.dynamic)
DYNAMIC_TOKEN_POLICIES = tuple(name for name, p in TOKEN_POLICIES.items() if p.dynamic)
ALL_POLICY_NAMES = tuple(dict.fromkeys(p.name for p in _POLICIES))


def policy(axis: str, name: str) -> Policy:
    """The policy `name` for `axis` (heads, tokens or mlp); a ValueError lists the choices."""
    table = _BY_AXIS[axis]
    if name not in table:
        label = "MLP channel" if axis == MLP else axis[:-1]
        raise InputError(f"unknown {label} policy {name!r}; choose one of {', '.join(table)}")
    return table[name]


def is_dynamic(token_policy: str) -> bool:
    return policy(TOKENS, token_policy).dynamic


def axis_policies(heads: bool, head_policy: str, tokens: bool, token_policy: str, mlp: bool = False,
                  mlp_policy: str = "taylor") -> dict[str, str]:
    """{axis: policy} of the axes pruned (heads if `heads`, tokens if `tokens`, MLP channels if `mlp`)."""
    return {axis: name for axis, used, name in ((HEADS, heads, head_policy), (TOKENS, tokens, token_policy),
                                                (MLP, mlp, mlp_policy)) if used}


def needs_calibration(heads: bool, head_policy: str, tokens: bool, token_policy: str, mlp: bool = False,
                      mlp_policy: str = "taylor") -> bool:
    """Whether pruning heads (if `heads`), tokens (if `tokens`) and MLP channels (if `mlp`) by
    these policies scores on data."""
    used = axis_policies(heads, head_policy, tokens, token_policy, mlp, mlp_policy)
    return any(policy(axis, name).needs_data for axis, name in used.items())


def needs_gradients(heads: bool, head_policy: str, tokens: bool, token_policy: str, mlp: bool = False,
                    mlp_policy: str = "taylor") -> bool:
    """Whether that scoring needs a backward pass (entropy needs the attention maps only)."""
    used = axis_policies(heads, head_policy, tokens, token_policy, mlp, mlp_policy)
    return any(policy(axis, name).gradients for axis, name in used.items())


def peer_policy(used: dict[str, str]) -> str | None:
    """The peer policy a configuration prunes by ({axis: policy} of the axes it prunes), or None.
    A peer plans heads and MLP channels in one pass: it cannot share a plan with other policies."""
    peers = {name for axis, name in used.items() if policy(axis, name).peer}
    if not peers:
        return None
    if len(peers) > 1 or len(set(used.values())) > 1 or TOKENS in used:
        raise InputError(f"{', '.join(sorted(peers))} plans heads and MLP channels together: use it on every "
                         f"pruned axis and prune no tokens (got {', '.join(f'{a}: {p}' for a, p in used.items())})")
    return peers.pop()
