"""What the suite measures: cases and profiles over pruning configurations (`PruneSpec`, in
`amg.benchmark.config_ids`).

A case adds backend, precision and batch to a configuration. `PROFILES` are the sets
`pytest bench/ --amg-profile` chooses from; `build_cases` expands one, with the command
line's overrides; the study generators (`equal_macs_specs`, `mlp_study_specs`, ...) build
the equal-MACs studies' configurations, picked by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from amg.benchmark.config_ids import POLICY_FIELD, UNPRUNED, PruneSpec  # (PruneSpec, UNPRUNED: re-exported)
from amg.errors import InputError
from amg.measure.backend_registry import BACKENDS, GPU_BACKENDS
from amg.pruning.policies import HEAD_POLICIES, SAVING_MODES, TOKEN_POLICIES, is_dynamic
from amg.pruning.schedule import Schedule


@dataclass(frozen=True)
class Case:
    spec: PruneSpec
    backend: str
    batch: int
    precision: str = "fp32"
    model: str = ""  # a preset of a profile that spans models ("": the session's model)

    @property
    def id(self) -> str:
        name = f"{self.spec.config_id}-{self.backend}-{self.precision}-b{self.batch}"
        return f"{self.model}-{name}" if self.model else name


@dataclass(frozen=True)
class Profile:
    ratios: tuple[float, ...]
    head_policies: tuple[str, ...]
    token_policies: tuple[str, ...]
    batches: tuple[int, ...]
    backends: tuple[str, ...]
    paired_rounds: int  # interleaved unpruned/pruned rounds behind each speed-up
    rounds: int  # pytest-benchmark rounds behind each latency
    combined: bool = True  # also heads + tokens at each ratio, with the AMG policies
    accuracy: bool = True
    memory: bool = True
    specs: tuple[PruneSpec, ...] = ()  # fixed configurations (then `ratios` and policies are unused)
    # fp16/bf16 autocast runs on the GPU backends only, unless precisions are asked for explicitly
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
    # reduced precisions that also run on every CPU backend that has them (e.g. int8 on the runtimes)
    cpu_precisions: tuple[str, ...] = ()
    # presets measured with random weights, each in turn (no accuracy); () the session's model
    models: tuple[str, ...] = ()
    # (backend, batches) pairs replacing `batches` for that backend, e.g. large batches only on the fastest one
    backend_batches: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # every configuration with the class-token-only last block (the unpruned full model stays, as the
    # reference of every speed-up), with the full one, or both (`LAST_BLOCKS`)
    last_block: str = "class-token"

    def batches_on(self, backend: str) -> tuple[int, ...]:
        return dict(self.backend_batches).get(backend, self.batches)


# The equal-MACs study: every policy at the same fvcore MACs savings, one-shot, fine-tuned
# and iterative at the same fine-tuning cost (300 distilled steps, ~1.5 min each on 2 cores,
# cached). Savings a mode cannot reach on the model skip with the reachable maximum. The
# studies measure the full last block: their savings are the pruning's own.
STUDY_SAVINGS = (0.1, 0.2, 0.3, 0.4)
STUDY_STEPS = 300
RANDOM_SEEDS = (0, 1, 2)  # draws of every random configuration: the table shows their mean and spread
_HEAD_METHODS = [("amg", "global"), ("amg", "keep-one"), ("amg", "per-block"), ("amg-lowest", "global"),
                 ("random", "global"), ("magnitude", "global"), ("gradient", "global")]
_TOKEN_METHODS = ["amg", "random", "evit", "tome"]
_BOTH_METHODS = [("amg", "amg", "global"), ("amg", "amg", "keep-one"), ("amg", "amg", "per-block"),
                 ("random", "random", "global")]


DEPLOY_SAVINGS = (0.1, 0.2, 0.3)
LAST_BLOCKS = ("class-token", "full", "both")


def _random_by(saving: float, by: str) -> PruneSpec:
    """The random policy on the axes `by` names (the others keep their defaults, as config ids read back)."""
    return PruneSpec(saving=saving, by=by, **{POLICY_FIELD[axis]: "random" for axis in SAVING_MODES[by]})


def equal_macs_specs(savings: Sequence[float] = STUDY_SAVINGS, steps: int = STUDY_STEPS) -> tuple[PruneSpec, ...]:
    finetune, iterative = Schedule("finetune", steps), Schedule("iterative", steps, rounds=3)
    specs: list[PruneSpec] = [PruneSpec(schedule=finetune)]  # what the extra training alone buys
    for saving in savings:
        heads = [PruneSpec(head_policy=p, allocation=a, saving=saving, by="heads") for p, a in _HEAD_METHODS]
        tokens = [PruneSpec(token_policy=p, saving=saving, by="tokens") for p in _TOKEN_METHODS]
        both = [PruneSpec(head_policy=h, token_policy=t, allocation=a, saving=saving, by="both")
                for h, t, a in _BOTH_METHODS]
        specs += heads + tokens + both
        amg_heads = [s for s in heads if s.head_policy == "amg"]
        amg_both = [s for s in both if s.head_policy == "amg"]
        # Fine-tuning where a method family is at home: static tokens only reach ~15% on
        # small ViTs, heads ~29%, heads + tokens ~32%; EViT/ToMe go further. Picked by name:
        # reordering a method list must not change the study.
        tuned = [s for s in heads if s.head_policy in ("amg", "random", "gradient")] + both \
            + [s for s in tokens if is_dynamic(s.token_policy)]
        iterated = amg_heads + amg_both  # global (the reference), keep-one and per-block
        if saving < 0.15:
            reference_heads = _named(heads, head_policy="amg", allocation="global")
            tuned = [reference_heads, _named(heads, head_policy="random")] \
                + [s for s in tokens if s.token_policy in ("amg", "random")]
            iterated = [reference_heads, _named(tokens, token_policy="amg")]
        specs += [replace(s, schedule=finetune) for s in tuned]
        specs += [replace(s, schedule=iterative) for s in iterated]
    return tuple(other for spec in specs for other in _draws(spec))


MLP_SAVINGS = (0.3, 0.4, 0.5)
LONG_STEPS = 800  # the longer fine-tuning budget the MLP study is also stated at


def mlp_study_specs(savings: Sequence[float] = MLP_SAVINGS, steps: int = STUDY_STEPS) -> tuple[PruneSpec, ...]:
    """Beyond heads and tokens: MLP channels alone (Taylor, magnitude, random), AMG heads + tokens
    + Taylor MLP channels, the same at random, ToMe, and on Torch-Pruning's axes (heads + MLP
    channels) Torch-Pruning's Group-Taylor and magnitude next to AMG heads + Taylor MLP, at
    savings static heads + tokens cannot reach; one-shot and fine-tuned."""
    finetune = Schedule("finetune", steps)
    specs: list[PruneSpec] = [PruneSpec(schedule=finetune)]
    for saving in savings:
        alone = [PruneSpec(saving=saving, by="mlp", mlp_policy=p) for p in ("taylor", "magnitude", "random")]
        everything = [PruneSpec(saving=saving, by="all"), _random_by(saving, "all")]
        tome = PruneSpec(saving=saving, by="tokens", token_policy="tome")
        peer_axes = [PruneSpec(saving=saving, by="heads-mlp"), _random_by(saving, "heads-mlp"), *_peer_specs(saving)]
        specs += [draw for spec in alone + everything + [tome] + peer_axes for draw in _draws(spec)]
        # one draw of each random method fine-tuned: the seeds' spread is measured one-shot
        taylor, random_channels = _named(alone, mlp_policy="taylor"), _named(alone, mlp_policy="random")
        specs += [replace(s, schedule=finetune) for s in (taylor, random_channels, *everything, tome, *peer_axes)]
    return tuple(specs)


def _peer_specs(saving: float) -> list[PruneSpec]:
    """Torch-Pruning's policies at `saving`, on the axes they prune (heads and MLP channels)."""
    return [PruneSpec(saving=saving, by="heads-mlp", head_policy=name, mlp_policy=name)
            for name in ("tp-taylor", "tp-magnitude")]


def long_finetune_specs(savings: Sequence[float] = MLP_SAVINGS, steps: int = LONG_STEPS) -> tuple[PruneSpec, ...]:
    """The MLP study's main contenders fine-tuned `steps` distilled steps, next to the unpruned model
    given the same: AMG heads + tokens + Taylor MLP and Torch-Pruning's Group-Taylor at every
    saving, all at random where the targets are (30 and 40%). ToMe stays at the shorter budget
    (at 30-40% it ran slower than the unpruned model on OpenVINO: README, "Beyond 30% of MACs")."""
    finetune = Schedule("finetune", steps)
    contenders = []
    for saving in savings:
        contenders += [PruneSpec(saving=saving, by="all"), _named(_peer_specs(saving), head_policy="tp-taylor")]
        contenders += [_random_by(saving, "all")] if saving <= 0.4 else []
    return tuple(replace(spec, schedule=finetune) for spec in [UNPRUNED, *contenders])


def quick_study_specs(saving: float = 0.2, steps: int = 100) -> tuple[PruneSpec, ...]:
    """A small slice of the equal-MACs study (minutes on 2 cores): AMG against random heads (three
    draws), AMG tokens and heads + tokens one-shot; AMG and random heads and the unpruned model
    fine-tuned `steps` steps."""
    finetune = Schedule("finetune", steps)
    heads = [PruneSpec(saving=saving, by="heads"), *_draws(_random_by(saving, "heads"))]
    one_shot = heads + [PruneSpec(saving=saving, by="tokens"), PruneSpec(saving=saving, by="both")]
    first_draw = _named(heads, head_policy="random", seed=RANDOM_SEEDS[0])
    tuned = [replace(spec, schedule=finetune) for spec in (UNPRUNED, _named(heads, head_policy="amg"), first_draw)]
    return tuple(one_shot + tuned)


def _named(specs: Sequence[PruneSpec], **fields: object) -> PruneSpec:
    """The one spec of `specs` with these field values (a study picks its members by name, not position)."""
    [spec] = [s for s in specs if all(getattr(s, name) == value for name, value in fields.items())]
    return spec


def _draws(spec: PruneSpec) -> list[PruneSpec]:
    return [replace(spec, seed=seed) for seed in RANDOM_SEEDS] if spec.random else [spec]


PROFILES = {
    # <= 2 minutes on a 2-core CPU once the default model is cached
    # (a forward of the small model takes ~5 ms: many rounds cost little and steady the ratio)
    "quick": Profile(ratios=(0.25,), head_policies=("amg", "random"), token_policies=("amg", "random"),
                     batches=(1,), backends=("cpu",), paired_rounds=200, rounds=50),
    # what CI gates on: the quick profile's policies at 25% and 50%, in eager PyTorch and ONNX
    # Runtime, so that some savings (heads 50%: ~15% of latency) are several times the
    # run-to-run drift (~3%) and losing them fails the gate; 600 interleaved pairs keep the
    # intervals of the 1.5 ms ONNX Runtime passes narrow; every configuration with the full last
    # block and with the class-token one, so that losing either saving fails; <= 10 minutes on 2 cores
    "ci": Profile(ratios=(0.25, 0.5), head_policies=("amg", "random"), token_policies=("amg", "random"),
                  batches=(1,), backends=("cpu", "onnxruntime"), paired_rounds=600, rounds=50, last_block="both"),
    # <= 5 minutes once cached: two ratios, the main baselines, batch 1 and 32, deployment backends
    "default": Profile(ratios=(0.25, 0.5), head_policies=("amg", "random", "magnitude", "gradient"),
                       token_policies=("amg", "random", "tome"), batches=(1, 32),
                       backends=("cpu", "cuda", "jetson", "rpi", "onnxruntime", "openvino"), paired_rounds=12,
                       rounds=8),
    # the equal-MACs study behind the README's results tables (~2 hours on 2 cores the
    # first time, for the fine-tuning; then ~20 minutes)
    "equal-macs": Profile(ratios=(), head_policies=(), token_policies=(), batches=(1, 32), backends=("cpu",),
                          paired_rounds=12, rounds=8, specs=equal_macs_specs(), last_block="full"),
    # a slice of it to try a study (and its cluster run) in minutes: `amg study run --profile equal-macs-quick`
    "equal-macs-quick": Profile(ratios=(), head_policies=(), token_policies=(), batches=(1,), backends=("cpu",),
                                paired_rounds=50, rounds=10, specs=quick_study_specs(), last_block="full"),
    # MLP channel pruning at 30/40/50% of MACs against random, ToMe and Torch-Pruning (about 55
    # minutes on 2 cores the first time, for 28 fine-tunings, then about 10)
    "mlp": Profile(ratios=(), head_policies=(), token_policies=(), batches=(1,), backends=("cpu", "openvino"),
                   paired_rounds=100, rounds=20, memory=False, specs=mlp_study_specs(), last_block="full"),
    # the main contenders fine-tuned 800 steps (about 40 minutes on 2 cores the first time, for 9
    # fine-tunings of about 4.3 minutes each)
    "mlp-long": Profile(ratios=(), head_policies=(), token_policies=(), batches=(1,), backends=("cpu",),
                        paired_rounds=50, rounds=10, memory=False, specs=long_finetune_specs(), last_block="full"),
    # pruning vs INT8 vs both on the embedded default, with the accuracy of every quantized
    # model as the runtime runs it; <= 5 minutes on 2 cores once cached
    "int8": Profile(ratios=(0.25, 0.5), head_policies=("amg",), token_policies=("amg",), batches=(1,),
                    backends=("onnxruntime", "openvino"), paired_rounds=200, rounds=30, memory=False,
                    cpu_precisions=("int8",)),
    # deployment sizes at 256x128 with random weights (latency, MACs; no accuracy): every plan
    # reaches 10/20/30% of MACs by heads, tokens or both (random policies: the latency of a plan
    # depends on its shapes, not on which heads go); batch 1 on eager PyTorch and the two CPU
    # runtimes, batch 8 on OpenVINO (the fastest here) only: ~20 minutes on 2 cores (inductor
    # was slower than OpenVINO on ViT-Small: --amg-backends adds it)
    "deploy": Profile(ratios=(), head_policies=(), token_policies=(), batches=(1,),
                      backends=("cpu", "onnxruntime", "openvino"), paired_rounds=10, rounds=5, accuracy=False,
                      backend_batches=(("openvino", (1, 8)),),
                      memory=False, specs=tuple(_random_by(saving, by) for saving in DEPLOY_SAVINGS
                                                for by in ("heads", "tokens", "both")),
                      models=("vit_small", "vit_base", "transreid_base")),
    "full": Profile(ratios=(0.25, 0.5, 0.75), head_policies=("amg", "amg-lowest", "random", "magnitude", "gradient"),
                    token_policies=("amg", "random", "evit", "tome"), batches=(1, 32),
                    backends=("cpu", "cuda", "jetson", "rpi", "torchscript", "onnxruntime", "openvino"),
                    paired_rounds=30, rounds=20),
}


def build_cases(profile: Profile, ratios: Sequence[float] | None = None, policies: Sequence[str] | None = None,
                backends: Sequence[str] | None = None, batches: Sequence[int] | None = None,
                precisions: Sequence[str] | None = None, models: Sequence[str] | None = None,
                last_block: str | None = None) -> list[Case]:
    """The profile's cases; explicit `ratios`/`policies`/`backends`/`batches`/`precisions`/`models`/
    `last_block` replace its own."""
    if profile.specs:
        if ratios:
            raise InputError("this profile fixes its configurations by MACs saving: ratios do not apply")
        specs = [UNPRUNED] + [spec for spec in profile.specs
                              if not policies or all(policy in policies for policy in spec.used_policies)]
    else:
        specs = _ratio_specs(profile, ratios or profile.ratios, policies)
    specs = with_last_block(specs, last_block or profile.last_block)
    return [Case(spec, backend, batch, precision, model) for model in (models or profile.models or ("",))
            for backend in (backends or profile.backends)
            for precision in (precisions or profile.precisions + profile.cpu_precisions)
            if precisions or _profile_runs(profile, backend, precision)
            for batch in (batches or profile.batches_on(backend)) for spec in specs]


def study_configurations(profile: Profile) -> list[str]:
    """The configurations whose accuracy `profile` reports, in its order (the unpruned model first),
    each once: what `amg study run --profile` computes."""
    if not profile.accuracy or profile.models:
        raise InputError("this profile times presets with random weights: it has no accuracy to study")
    cases = build_cases(profile, last_block="full")
    return list(dict.fromkeys(case.spec.pruning.config_id for case in cases))


def with_last_block(specs: Sequence[PruneSpec], last_block: str) -> list[PruneSpec]:
    """`specs` with the class-token-only last block ("class-token"; the unpruned full model is kept:
    every speed-up is over it), without ("full"), or both. Dynamic token policies choose tokens
    from every row of every block: they keep the full block."""
    if last_block not in LAST_BLOCKS:
        raise InputError(f"the last block is one of {', '.join(LAST_BLOCKS)}, got {last_block!r}")
    dynamic = [spec for spec in specs if spec.uses_tokens and is_dynamic(spec.token_policy)]
    fast = [replace(spec, class_token_block=True) for spec in specs if spec not in dynamic]
    if last_block == "full":
        return list(specs)
    if last_block == "both":
        return list(specs) + fast
    return [UNPRUNED, *fast, *dynamic]


def _profile_runs(profile: Profile, backend: str, precision: str) -> bool:
    if precision not in BACKENDS[backend].precisions:
        return False
    return precision == "fp32" or backend in GPU_BACKENDS or precision in profile.cpu_precisions


def _ratio_specs(profile: Profile, ratios: Sequence[float], policies: Sequence[str] | None) -> list[PruneSpec]:
    head_policies = tuple(p for p in (policies or profile.head_policies) if p in HEAD_POLICIES)
    token_policies = tuple(p for p in (policies or profile.token_policies) if p in TOKEN_POLICIES)
    specs = [UNPRUNED]
    for ratio in ratios:
        specs += [PruneSpec(heads=ratio, head_policy=p) for p in head_policies]
        specs += [PruneSpec(tokens=ratio, token_policy=p) for p in token_policies]
        if profile.combined and "amg" in head_policies and "amg" in token_policies:
            specs.append(PruneSpec(heads=ratio, tokens=ratio))
    return specs
