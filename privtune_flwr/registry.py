"""The defences, each described once: its options (defaults and help), its statement and its summary.

Every name a run config, a device policy, the accounting or the sweep may use is registered here
with a :class:`DefenseSpec`. The spec carries

* ``options``: one frozen dataclass whose fields are the defence's knobs, with their defaults and a
  line of help (``field.metadata["help"]``). :class:`~privtune_flwr.config.RunConfig` takes its
  defaults from these dataclasses, and the defences' constructors take theirs from them too;
* ``statement(options, ...)``: the public :class:`~privtune_flwr.accounting.PrivacyStatement` of a
  configuration. The device's defence object and the cloud's run config both call it, so the
  statement is built one way only;
* ``summary(options)``: the settings shown in a run's one-line description;
* what the device policy asks of a defence: whether it adds noise, fits on the device's labels, or
  shifts each token's mean by an input-dependent amount.

The module imports no torch, so a launcher can check a configuration in a fraction of a second.
The classes that implement each name are in :mod:`privtune_flwr.defenses` (its own ``DEFENSES``,
of classes); a test keeps the two lists of names equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from .accounting import PrivacyStatement, public_scales


def _option(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NoOptions:
    """A defence with no options of its own."""


@dataclass(frozen=True)
class GraphOptions:
    """The public anchor graph: each token's ``k`` nearest anchors, walked ``n_hops`` hops."""

    n_hops: int = _option(2, "hops of the anchor graph that make a token's indirect neighbours")
    k: int = _option(8, "nearest anchors per token in the graph")
    max_neighbours: int = _option(16, "the most n-hop neighbours kept per token")


@dataclass(frozen=True)
class PrivTuneOptions(GraphOptions):
    """PrivTune's mean shift (solved by PGD) and importance-scaled d_chi noise."""

    radius_scale: float = _option(1.0, "the shift's radius, in units of the anchors' median distance")
    pgd_steps: int = _option(10, "projected gradient steps of the shift")
    lam: float = _option(0.5, "weight of the push away from the token's own anchor")
    mu: float = _option(1.0, "weight of keeping the pooled meaning")
    s_min: float = _option(0.5, "the smallest noise scale (the most important tokens)")
    alpha: float = _option(0.5, "mix of frequency and label association in token importance")
    importance_levels: int = _option(3, "public noise-scale levels (0 = continuous: no bound across importance)")


@dataclass(frozen=True)
class GaussianOptions:
    """Per-token clipping and Gaussian noise (analytic Gaussian mechanism)."""

    delta: float = _option(1e-5, "the (epsilon, delta) mechanism's delta")
    clip: float = _option(0.0, "each token's norm bound; 0 = the anchor table's median norm")


@dataclass(frozen=True)
class LabelSubspaceOptions:
    """The projection onto a label subspace fitted on labelled data, with d_chi noise in it."""

    subspace_rank: int = _option(2, "directions kept per token (2 at split 3; >= classes - 1)")
    subspace_fit: str = _option("reader", "'reader' (a small reader trained with the projection) or 'closed-form'")


@dataclass(frozen=True)
class LabelObfuscatorOptions:
    """A small network's label features, with d_chi noise on them."""

    subspace_rank: int = _option(2, "features kept per token")


@dataclass(frozen=True)
class DefenseSpec:
    """One defence's public description (see the module docstring)."""

    name: str
    help: str
    options: type = NoOptions
    noisy: bool = True  # False: no noise at all (epsilon has no meaning)
    fits_labels: bool = False  # fitted on the device's class labels (classification only)
    shifts: bool = False  # an input-dependent mean shift of public radius (the statement's slack)
    scaled: bool = False  # noise scaled by private token importance, in public levels
    build_statement: Callable[..., PrivacyStatement] | None = None
    shown: Callable[[Any], dict] | None = None

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.options))

    def defaults(self) -> Any:
        return self.options()

    def options_from(self, source: Any) -> Any:
        """The options read from ``source``: a mapping, or any object with attributes of the same
        names (a :class:`~privtune_flwr.config.RunConfig`, a defence); missing ones keep their
        defaults."""
        get = source.get if isinstance(source, Mapping) else (lambda name, default: getattr(source, name, default))
        return self.options(**{f.name: get(f.name, f.default) for f in fields(self.options)})

    def statement(self, options: Any, *, epsilon: float | None, release: str = "once", reproducible: bool = False,
                  key_source: str = "os-entropy", radius: float = 0.0) -> PrivacyStatement:
        """The statement of this defence at ``options`` and ``epsilon``; ``radius`` is the public
        bound on the mean shift (ignored by a defence that does not shift)."""
        common = {"release": release, "reproducible": reproducible, "key_source": key_source}
        if not self.noisy:
            return PrivacyStatement(defense=self.name, epsilon=None, **common)
        extra = {} if self.build_statement is None else self.build_statement(self, options, epsilon)
        if self.shifts:
            extra["radius"] = radius
        return PrivacyStatement(defense=self.name, epsilon=epsilon, **extra, **common)

    def summary(self, options: Any) -> dict:
        """The settings a run's one-line description shows for this defence."""
        return {} if self.shown is None else self.shown(options)


def _gaussian(spec: DefenseSpec, options: GaussianOptions, epsilon: float) -> dict:
    clip = options.clip or None
    sigma = None
    if clip is not None:
        from .mechanism.gaussian import analytic_gaussian_sigma  # scipy: only when there is a clip

        sigma = analytic_gaussian_sigma(epsilon, options.delta, 2.0 * clip)
    return {"delta": options.delta, "clip": clip, "sigma": sigma}


def _privtune(spec: DefenseSpec, options: PrivTuneOptions, epsilon: float) -> dict:
    scales, continuous = public_scales(options.s_min, options.importance_levels, scaled=spec.scaled)
    return {"scales": scales, "continuous": continuous}


def _privtune_shown(options: PrivTuneOptions) -> dict:
    return {"n-hops": options.n_hops, "k": options.k, "s-min": f"{options.s_min:g}",
            "radius-scale": f"{options.radius_scale:g}"}


def _label_shown(options) -> dict:
    shown = {"rank": options.subspace_rank}
    if getattr(options, "subspace_fit", "reader") != "reader":
        shown["fit"] = options.subspace_fit
    return shown


DEFENSES: dict[str, DefenseSpec] = {}


def register(spec: DefenseSpec) -> DefenseSpec:
    if spec.name in DEFENSES:
        raise ValueError(f"defense {spec.name!r} is registered twice")
    DEFENSES[spec.name] = spec
    return spec


def get(name: str) -> DefenseSpec:
    if name not in DEFENSES:
        raise ValueError(f"defense={name!r} is unknown; accepted: {', '.join(DEFENSES)}")
    return DEFENSES[name]


def all_option_names() -> tuple[str, ...]:
    """Every option any defence takes (a defence ignores the others')."""
    names: dict[str, None] = {}
    for spec in DEFENSES.values():
        names.update(dict.fromkeys(spec.option_names()))
    return tuple(names)


register(DefenseSpec("none", "releases the representations unchanged: the utility upper bound", noisy=False))
register(DefenseSpec("dchi", "isotropic d_chi noise, no mean shift, no importance scaling",
                     build_statement=lambda spec, options, epsilon: {"scales": (1.0,)}))
register(DefenseSpec("gaussian", "DP-Forward-style baseline: clip each token, add Gaussian noise", GaussianOptions,
                     build_statement=_gaussian,
                     shown=lambda o: {"delta": f"{o.delta:g}", "clip": f"{o.clip:g}" if o.clip else "auto"}))
for _name, _help, _shifts, _scaled in (
    ("privtune", "PrivTune: PGD mean shift towards n-hop neighbours, importance-scaled d_chi noise", True, True),
    ("privtune-noimp", "ablation: every token at noise scale 1", True, False),
    ("privtune-nomean", "ablation: no mean shift (importance-scaled d_chi noise)", False, True),
    ("privtune-random-target", "ablation: the shift's target is a random regular token, per release", True, True),
    ("privtune-sampled-target", "variant: the target is a ring member drawn per release", True, True),
):
    register(DefenseSpec(_name, _help, PrivTuneOptions, shifts=_shifts, scaled=_scaled, build_statement=_privtune,
                         shown=_privtune_shown))
register(DefenseSpec("label-subspace", "each token's projection onto a label subspace, with d_chi noise in it",
                     LabelSubspaceOptions, fits_labels=True, shown=_label_shown,
                     build_statement=lambda spec, o, epsilon: {"scales": (1.0,), "projection_rank": o.subspace_rank}))
register(DefenseSpec("label-obfuscator", "a small network's label features per token, with d_chi noise on them",
                     LabelObfuscatorOptions, fits_labels=True, shown=_label_shown,
                     build_statement=lambda spec, o, epsilon: {"scales": (1.0,), "learned_rank": o.subspace_rank}))

DEFENSE_NAMES = tuple(DEFENSES)
LABEL_DEFENSES = tuple(name for name, spec in DEFENSES.items() if spec.fits_labels)
