"""What a release guarantees, stated once: the privacy statement and its composition.

Every defence describes itself with a :class:`PrivacyStatement`; the device derives the public
bounds it may put in a reply from it (:meth:`PrivacyStatement.reply_metrics`); the cloud composes
them over a run (:func:`run_summary`). Every number here is a function of the public configuration
and of public lengths (the cloud sees the attention mask), never of the private tokens.

The guarantees, for a token released as ``y = h + delta(h) + s * z`` with ``z`` d_chi noise
(density proportional to ``exp(-eps ||z||)``), ``||delta|| <= r`` and public scale ``s``:

* two tokens released **at the same scale** ``s`` give output densities within a factor
  ``exp((eps / s) * ||h - h'|| + 2 r eps / s)`` (metric privacy on the split-layer representation,
  with additive slack from the input-dependent shift);
* between different scales there is no bound: the density ratio
  ``(s'/s)^d exp(eps ||y - mu'|| / s' - eps ||y - mu|| / s)`` grows without limit in ``y``, and since
  ``||z||`` concentrates (relative sd ~ 1/sqrt(d)) the norm of ``y - mu`` reveals ``s``. So a scale
  that depends on the private token is only safe as a few public **levels**: the level of each
  token is revealed, and the bound holds within a level;
* per sequence the bounds add over its tokens (two sequences compare only when their level
  patterns match), and the representation ``h`` of a token depends on its whole sequence (the
  bottom is contextual), so this is a statement about representations, not about text;
* over a run: with **release once** every later send of an example under the same configuration
  is the bit-identical tensor, i.e. post-processing, so it adds nothing; each fresh release (or
  each new configuration) adds the per-sequence bound again (basic composition).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RELEASE_MODES = ("once", "fresh")


def public_scales(s_min: float, levels: int, *, scaled: bool = True) -> tuple[tuple[float, ...], bool]:
    """The public noise scales of PrivTune's importance scaling, and whether they are continuous.

    ``levels >= 2``: ``s_k = 1 - (1 - s_min) k / (levels - 1)``; ``1`` (or no importance): ``(1,)``;
    ``0``: the paper's continuous scale in ``[s_min, 1]`` (returned as its two ends).
    """
    if not scaled or levels == 1:
        return (1.0,), False
    if levels == 0:
        return (s_min, 1.0), True
    top = levels - 1
    return tuple(1.0 - (1.0 - s_min) * k / top for k in range(levels)), False


def statement_for_config(cfg, *, radius: float = 0.0) -> "PrivacyStatement":
    """The statement of a run's configured defence, as the cloud can state it: from the run config
    (a :class:`~privtune_flwr.config.RunConfig`) and the public shift radius."""
    common = {"release": cfg.release, "reproducible": cfg.reproducible_noise,
              "key_source": f"seed {cfg.seed!r}" if cfg.reproducible_noise else "os-entropy"}
    if cfg.defense == "none":
        return PrivacyStatement(defense="none", epsilon=None, **common)
    if cfg.defense == "dchi":
        return PrivacyStatement(defense="dchi", epsilon=cfg.epsilon, **common)
    if cfg.defense == "label-subspace":
        return PrivacyStatement(defense=cfg.defense, epsilon=cfg.epsilon, projection_rank=cfg.subspace_rank, **common)
    if cfg.defense == "label-obfuscator":
        return PrivacyStatement(defense=cfg.defense, epsilon=cfg.epsilon, learned_rank=cfg.subspace_rank, **common)
    if cfg.defense == "gaussian":
        from .mechanism.gaussian import analytic_gaussian_sigma

        clip = cfg.clip or None
        sigma = None if clip is None else analytic_gaussian_sigma(cfg.epsilon, cfg.delta, 2.0 * clip)
        return PrivacyStatement(defense="gaussian", epsilon=cfg.epsilon, delta=cfg.delta, clip=clip, sigma=sigma, **common)
    scales, continuous = public_scales(cfg.s_min, cfg.importance_levels, scaled=cfg.defense != "privtune-noimp")
    shift = 0.0 if cfg.defense == "privtune-nomean" else radius
    return PrivacyStatement(defense=cfg.defense, epsilon=cfg.epsilon, scales=scales, continuous=continuous,
                            radius=shift, **common)


@dataclass(frozen=True)
class PrivacyStatement:
    """The public description of one defence configuration."""

    defense: str
    epsilon: float | None = None  # None: no noise at all
    scales: tuple[float, ...] = (1.0,)  # public noise levels s; the noise is d_chi at eps / s
    continuous: bool = False  # True: s varies continuously with private importance (no cross-token bound)
    radius: float = 0.0  # bound r on the input-dependent mean shift
    delta: float | None = None  # gaussian only
    sigma: float | None = None  # gaussian only
    clip: float | None = None  # gaussian only
    release: str = "once"
    reproducible: bool = False
    key_source: str = "os-entropy"
    experimental: str | None = None  # research variants: the words that replace a formal guarantee
    projection_rank: int | None = None  # label-subspace: the noise lives in a rank-k subspace fitted on device data
    learned_rank: int | None = None  # label-obfuscator: the noise lives on k features of a network fitted on device data

    def __post_init__(self):
        if self.release not in RELEASE_MODES:
            raise ValueError(f"release={self.release!r} is not accepted; accepted: {', '.join(RELEASE_MODES)}")

    # -- per token -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self.epsilon is None:
            return "none"
        return "gaussian" if self.delta is not None else "metric"

    @property
    def token_epsilon_max(self) -> float | None:
        """The largest per-token parameter over the levels: eps / s_min (eps for gaussian)."""
        if self.epsilon is None:
            return None
        return self.epsilon if self.kind == "gaussian" else self.epsilon / min(self.scales)

    @property
    def token_slack_max(self) -> float:
        """The largest per-token additive slack: 2 r eps / s_min."""
        if self.kind != "metric":
            return 0.0
        return 2.0 * self.radius * self.epsilon / min(self.scales)

    def levels(self) -> list[dict]:
        """Per public level: its scale, the effective parameter eps/s and the slack 2 r eps/s."""
        if self.kind != "metric":
            return []
        return [{"scale": s, "epsilon": self.epsilon / s, "slack": 2.0 * self.radius * self.epsilon / s}
                for s in sorted(self.scales, reverse=True)]

    def pair_bound(self, distance: float, scale_a: float, scale_b: float) -> float | None:
        """The claimed bound on ``log p(y | h) - log p(y | h')`` for two tokens at distance
        ``||h - h'||`` released at scales ``scale_a``/``scale_b``; None where nothing is claimed
        (different scales, or a scale that is not one of the public levels)."""
        if self.kind != "metric":
            return None
        if scale_a != scale_b or (not self.continuous and not any(math.isclose(scale_a, s) for s in self.scales)):
            return None
        return (self.epsilon / scale_a) * (distance + 2.0 * self.radius)

    # -- per sequence and over releases ---------------------------------------------------
    def sequence_bound(self, tokens: int) -> dict:
        """Worst case over level patterns for a sequence of ``tokens`` real tokens."""
        if self.epsilon is None:
            return {"epsilon": None, "slack": None, "delta": None}
        return {"epsilon": tokens * self.token_epsilon_max, "slack": tokens * self.token_slack_max,
                "delta": None if self.delta is None else tokens * self.delta}

    def composed(self, tokens: int, releases: int) -> dict:
        """``releases`` distinct releases of a sequence of ``tokens`` tokens (basic composition)."""
        one = self.sequence_bound(tokens)
        return {k: None if v is None else releases * v for k, v in one.items()}

    def reply_metrics(self, lengths) -> dict[str, float]:
        """The public bounds a device may attach to a reply: functions of the configuration and of
        the real-token counts ``lengths`` (which the attention mask already shows), nothing else."""
        if self.epsilon is None:
            return {}
        longest = int(max(int(n) for n in lengths)) if len(lengths) else 0
        seq = self.sequence_bound(longest)
        out = {"epsilon-token-max": float(self.token_epsilon_max), "epsilon-sequence-max": float(seq["epsilon"])}
        if self.kind == "metric":
            out.update({"slack-token-max": float(self.token_slack_max), "slack-sequence-max": float(seq["slack"]),
                        "shift-radius": float(self.radius)})
        return out

    # -- words -------------------------------------------------------------------------------
    def guarantee(self) -> str:
        """The statement in words, as the README, the run summary and the sweep rows give it."""
        if self.experimental:
            text = f"experimental variant: {self.experimental}"
        elif self.kind == "none":
            text = "none: representations are released unperturbed"
        elif self.kind == "gaussian":
            clip = "C (the median anchor norm)" if self.clip is None else f"{self.clip:.4g}"
            sigma = "" if self.sigma is None else f", sigma {self.sigma:.4g}"
            text = (f"(epsilon={self.epsilon:g}, delta={self.delta:g})-DP per token representation (replace one token; "
                    f"each token clipped to norm {clip}, L2 sensitivity twice that{sigma}); "
                    "per sequence of T tokens basic composition gives (T epsilon, T delta)")
        else:
            bound = f"exp((epsilon/s) * ||h - h'||{' + 2 r epsilon/s' if self.radius else ''})"
            shift = f", r = {self.radius:.4g} bounds the mean shift" if self.radius else ""
            if self.continuous:
                text = (f"metric privacy per token with density ratio at most {bound}, but ONLY between tokens with the "
                        f"same scale s in [{min(self.scales):g}, 1]: s varies continuously with the private token "
                        "importance, so almost no two distinct tokens share it, and the release's norm reveals s. "
                        "No bound holds between tokens of different importance")
            elif self.projection_rank is not None:
                text = (f"d_chi (metric) privacy per token on its projection onto a rank-{self.projection_rank} label "
                        f"subspace: output densities of two tokens differ by at most exp(epsilon * ||U^T (h - h')||), "
                        "which is at most exp(epsilon * ||h - h'||) (U has orthonormal columns). The subspace (its centre, "
                        "basis U and the constants released for special tokens) was fitted once on the device's own "
                        "labelled data and is revealed by the releases: it is aggregate information about that data "
                        "that no bound covers. The protection against token inversion comes from the projection and "
                        "is empirical (measured by the attacks), not implied by epsilon")
            elif self.learned_rank is not None:
                text = (f"d_chi (metric) privacy per token on its {self.learned_rank} learned label features u(h): "
                        "output densities of two tokens differ by at most exp(epsilon * ||u(h) - u(h')||). u is a "
                        "small network, so no bound in ||h - h'|| follows from this. The network (its weights, centre "
                        "and the constants released for special tokens) was fitted once on the device's own labelled "
                        "data, against a token inverter, and is revealed by the releases: it is aggregate information "
                        "about that data that no bound covers. The protection against token inversion comes from the "
                        "learned map and is empirical (measured by the attacks), not implied by epsilon")
            elif len(self.scales) == 1:
                text = (f"d_chi (metric) privacy per token on the split-layer representation: output densities of two "
                        f"tokens differ by at most {bound} with s = {self.scales[0]:g}{shift}")
            else:
                levels = ", ".join(f"{s:g}" for s in sorted(self.scales, reverse=True))
                text = (f"d_chi (metric) privacy per token within a public noise level: two tokens released at the same "
                        f"level s in {{{levels}}} give output densities within {bound}{shift}. Each token's level is "
                        "revealed (its noise norm concentrates around s d / epsilon); between levels there is no bound")
            text += ("; per sequence the bounds add over its tokens (representations are contextual: a statement about "
                     "representations, not text)")
        if self.kind != "none":
            text += "; " + self.release_words()
        return text

    def release_words(self) -> str:
        if self.reproducible:
            head = (f"REPRODUCIBLE NOISE ({self.key_source}): whoever knows the seed can regenerate and remove the noise, "
                    "so this release is NOT private against the operator who set the seed; ")
        else:
            head = "the noise comes from a key the device drew from OS entropy and never sends; "
        if self.release == "once":
            return head + ("each example is released once per configuration: a later send of it is the bit-identical "
                           "tensor (post-processing, nothing new leaks); a new configuration is a new release")
        return head + "fresh noise per release: every release of an example composes (basic composition)"

    def to_dict(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out.update(guarantee=self.guarantee(), levels=self.levels(),
                   token_epsilon_max=self.token_epsilon_max, token_slack_max=self.token_slack_max)
        return out


def run_summary(statement: PrivacyStatement, *, max_tokens: int, train_releases: int | None,
                test_releases: int | None) -> dict:
    """The run's privacy section: per token, per sequence of ``max_tokens`` tokens (the longest a
    device releases), and composed over the most releases of one training / test example."""
    seq = statement.sequence_bound(max_tokens)

    def composed(releases):
        if releases is None or statement.epsilon is None:
            return None
        return statement.composed(max_tokens, releases)

    return {
        "defense": statement.defense,
        "epsilon": statement.epsilon,
        "guarantee": statement.guarantee(),
        "reproducible-noise": statement.reproducible,
        "release": statement.release,
        "levels": statement.levels(),
        "epsilon-per-token-max": statement.token_epsilon_max,
        "slack-per-token-max": statement.token_slack_max if statement.kind == "metric" else None,
        "delta-per-token": statement.delta,
        "max-tokens-per-sequence": max_tokens,
        "epsilon-per-sequence-max": seq["epsilon"],
        "slack-per-sequence-max": seq["slack"],
        "releases-per-train-example-max": train_releases,
        "releases-per-test-example-max": test_releases,
        "per-train-sequence-composed": composed(train_releases),
        "per-test-sequence-composed": composed(test_releases),
        "composition": ("per token as stated; adds up over the tokens of a sequence and over every distinct release "
                        "of it (with release once, re-sends of the same example are not distinct releases)"),
    }


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
