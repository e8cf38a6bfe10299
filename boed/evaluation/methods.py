"""The method table: every scan method of the evaluation, written once.

One :class:`Method` per method: its CSV name, its command-line spellings, its legend label and
line style, the models it needs (keys of :data:`MODEL_FLAGS`), whether it needs the training split,
and ``build(ctx, method, task) -> Policy``. The CLI (flags, validation, loading), the evaluation
loop (task-free and repeat-free methods), the report (legend order, labels, styles), the demo, the
studies, the tests and the benchmarks all read this table. Adding a method is one entry here and
one :class:`boed.policies.Policy` subclass.

The table's order is the legend order of the paper's fig. 5/8 (then the amortised policies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ipa_core.ipa import IPA
from ipa_core.persist import weights_digest
from ipa_core.trainer import DAMAGED, check_finite_weights
from xray.errors import UserError

from ..amortised import PolicyNet, load_policy
from ..baselines.policies import ClairvoyantPolicy, FullImagePolicy, NonGreedyUncondPolicy, RandomPolicy, UncondPolicy
from ..baselines.samplers import RetrievalSampler
from ..geometry import ScanGeometry
from ..policies import FirstChoiceCache, GreedyPolicy, Policy
from ..samplers import DatasetSampler, IPASampler


# ----------------------------------------------------------------------------- models
def _load_ipa_model(flag: str, path: str, device, objective: str):
    try:
        model = IPA.from_pretrained(path, map_location=device).eval()
    except UserError as e:
        how = "--objective reverse " if objective == "reverse" else ""
        raise UserError(f"{flag} {path}: {e} (train one with `ipa_core train --stage ipa {how}--out {path}`)") from None
    check_finite_weights(model, f"the IPA model in {path}", DAMAGED)
    got = getattr(model.config, "objective", "forward")
    if got != objective:
        raise UserError(f"{flag} {path} holds an IPA trained with objective {got!r}, expected {objective!r}; "
                        f"pass a run trained with `ipa_core train --stage ipa --objective {objective}`")
    return model


def _check_policy_dir(flag: str, path: str, device) -> str:
    """Amortised policies are loaded per scan task by their builder (a policy knows its illness and
    grid); here only checked to be a policy run (one-line UserError otherwise)."""
    PolicyNet.from_pretrained(path)
    return str(path)


@dataclass(frozen=True)
class ModelFlag:
    """A model a method may need: its CLI flag, default, help and loader."""

    flag: str
    default: str | None
    help: str
    load: Callable[[str, str, Any], Any]  # (flag, path, device) -> model

    def digest(self, path: str) -> str:
        """The digest of the model's weights (provenance of the records)."""
        return weights_digest(path)


DEFAULT_IPA = "runs/demo/ipa"
MODEL_FLAGS: dict[str, ModelFlag] = {
    "ipa": ModelFlag("--ipa", DEFAULT_IPA, "IPA run or model dir", lambda f, p, d: _load_ipa_model(f, p, d, "forward")),
    "ipar": ModelFlag("--ipar", None, "IPA-R run or model dir (reverse-KL IPA) for method eig-ipar",
                      lambda f, p, d: _load_ipa_model(f, p, d, "reverse")),
    "ipa-under": ModelFlag("--ipa-under", None, "an under-trained IPA run (e.g. 1/8 of the steps) for method eig-ipa-under",
                           lambda f, p, d: _load_ipa_model(f, p, d, "forward")),
    "distilled": ModelFlag("--distilled", None, "policy run of method distilled (`boed train-policy --method distill`)",
                           _check_policy_dir),
    "gdfs": ModelFlag("--gdfs", None, "policy run of method gdfs (`boed train-policy --method gdfs`)", _check_policy_dir),
}


# ----------------------------------------------------------------------------- builders
@dataclass
class BuildContext:
    """What every policy builder gets."""

    cfg: Any  # boed.evaluation.config.EvalConfig
    classifier: torch.nn.Module
    geometry: ScanGeometry
    device: torch.device
    train_set: Any  # training split (t = 1 draws, Uncond, retrieval database), or None
    models: dict = field(default_factory=dict)  # MODEL_FLAGS key -> loaded model
    paths: dict = field(default_factory=dict)  # MODEL_FLAGS key -> path given
    amp: bool = True
    first_cache: FirstChoiceCache | None = None  # t = 1 choices shared by all policies
    retrieval: RetrievalSampler | None = None  # one database for every task

    def dataset_sampler(self) -> DatasetSampler:
        return DatasetSampler(self.train_set)

    def greedy(self, method: str, task: str, sampler, estimator: str = "eig") -> GreedyPolicy:
        return GreedyPolicy(self.classifier, sampler, task, self.geometry, n_samples=self.cfg.n_samples,
                            estimator=estimator, first_sampler=self.dataset_sampler(), device=self.device,
                            name=method, amp=self.amp, first_cache=self.first_cache)

    def ipa_sampler(self, key: str) -> IPASampler:
        return IPASampler(self.models[key], temperature=self.cfg.temperature, amp=self.amp)


def _greedy_ipa(key: str, estimator: str = "eig"):
    return lambda ctx, method, task: ctx.greedy(method, task, ctx.ipa_sampler(key), estimator)


def _retrieval(ctx: BuildContext, method: str, task: str) -> Policy:
    if ctx.retrieval is None:
        ctx.retrieval = RetrievalSampler(ctx.train_set)
    return ctx.greedy(method, task, ctx.retrieval)


def _uncond(ctx: BuildContext, method: str, task: str) -> Policy:
    return UncondPolicy(ctx.classifier, ctx.dataset_sampler(), task, ctx.geometry, n_samples=ctx.cfg.n_samples,
                        device=ctx.device, amp=ctx.amp, first_cache=ctx.first_cache)


def _nongreedy(ctx: BuildContext, method: str, task: str) -> Policy:
    return NonGreedyUncondPolicy(ctx.classifier, ctx.dataset_sampler(), task, ctx.geometry, n_samples=ctx.cfg.n_samples,
                                 n_sequences=ctx.cfg.n_sequences, scans=ctx.cfg.scans, device=ctx.device, amp=ctx.amp,
                                 first_cache=ctx.first_cache)


def _amortised(ctx: BuildContext, method: str, task: str) -> Policy:
    return load_policy(ctx.paths[method], task, ctx.geometry, ctx.device)


def _random(ctx: BuildContext, method: str, task) -> Policy:
    return RandomPolicy(ctx.geometry)


def _clairvoyant(ctx: BuildContext, method: str, task: str) -> Policy:
    return ClairvoyantPolicy(ctx.classifier, task, ctx.geometry, device=ctx.device, amp=ctx.amp, name=method)


def _full(ctx: BuildContext, method: str, task) -> Policy:
    return FullImagePolicy()


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Method:
    """One scan method of the evaluation."""

    name: str  # the CSV name
    aliases: tuple[str, ...]  # other command-line spellings
    label: str  # legend label
    style: tuple[str | None, str]  # (matplotlib colour, line style)
    models: tuple[str, ...]  # MODEL_FLAGS keys it needs
    train_data: bool  # needs the training split
    build: Callable[[BuildContext, str, Any], Policy]
    task_free: bool = False  # scan locations do not depend on the task: scanned once, scored for every task
    repeat_free: bool = False  # records do not depend on the repeat (no policy randomness): computed once


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("eig-ipa", ("eig",), "EIG-IPA", ("C0", "-"), ("ipa",), True, _greedy_ipa("ipa", "eig")),
    Method("eig-ipar", ("ipar",), "EIG-IPA-R", ("C3", "-"), ("ipar",), True, _greedy_ipa("ipar", "eig")),
    Method("eig-ipa-under", ("ipa-under",), "EIG-IPA (under-trained)", ("C9", "-"), ("ipa-under",), True,
           _greedy_ipa("ipa-under", "eig")),
    Method("eig-retrieval", ("retrieval",), "EIG-retrieval", ("C6", "-"), (), True, _retrieval),
    Method("epe-ipa", ("epe",), "EPE-IPA", ("C1", "-"), ("ipa",), True, _greedy_ipa("ipa", "epe")),
    Method("uncond", (), "Uncond", ("C2", "--"), (), True, _uncond),
    Method("nongreedy", ("non-greedy",), "Non-greedy uncond", ("C4", "--"), (), True, _nongreedy),
    Method("random", (), "Random", ("C5", ":"), (), False, _random, task_free=True),
    Method("clairvoyant", ("oracle",), "Clairvoyant (true image)", ("C8", "-."), (), False, _clairvoyant),
    Method("full", (), "Full image", ("k", "-."), (), False, _full, task_free=True, repeat_free=True),
    Method("distilled", ("distill",), "distilled", (None, "-"), ("distilled",), False, _amortised),
    Method("gdfs", (), "gdfs", (None, "-"), ("gdfs",), False, _amortised),
)}
# command-line spelling -> CSV name
METHOD_ALIASES: dict[str, str] = {a: m.name for m in METHODS.values() for a in (m.name, *m.aliases)}


def method_names() -> list[str]:
    """Canonical method names, in table (legend) order."""
    return list(METHODS)


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"eig,epe,random"`` -> canonical CSV names, deduplicated in order; UserError on unknown names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        key = raw.strip().lower()
        if not key:
            continue
        if key not in METHOD_ALIASES:
            short = ", ".join(a for m in METHODS.values() for a in m.aliases)
            raise UserError(f"unknown method {raw.strip()!r}; choose from {', '.join(method_names())} (short forms: {short})")
        if METHOD_ALIASES[key] not in out:
            out.append(METHOD_ALIASES[key])
    if not out:
        raise UserError("no methods given; pass e.g. --methods eig,random,full")
    return tuple(out)


def needed_models(methods: Sequence[str]) -> list[str]:
    """The MODEL_FLAGS keys that ``methods`` need, each once, in order."""
    return list(dict.fromkeys(k for m in methods for k in METHODS[m].models))


def build_policies(cfg, ctx: BuildContext) -> dict[tuple[str, str | None], Policy]:
    """The policy of every (method, scan task) of ``cfg`` (an :class:`.config.EvalConfig`)."""
    if ctx.first_cache is None:
        ctx.first_cache = FirstChoiceCache()
    return {(m, t): METHODS[m].build(ctx, m, t) for m, t in cfg.jobs()}
