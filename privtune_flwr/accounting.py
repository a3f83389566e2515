"""What a release guarantees, stated once: the privacy statement and its composition.

Every defence describes itself with a :class:`PrivacyStatement`, which its entry in
:mod:`privtune_flwr.registry` builds (for the device's defence object and the cloud's run config
alike); the device derives the public bounds it may put in a reply from it (:meth:`PrivacyStatement.reply_metrics`); the cloud composes
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
  each new configuration) adds the per-sequence bound again (basic composition);
* across configurations and runs: a new configuration draws new noise for the same example, and
  the cloud may average such releases (or solve for ``h + delta`` from correlated ones). So the
  device keeps a per-example :class:`ReleaseLedger` and refuses an instruction that would take any
  example past its policy's ``max-releases-per-example`` distinct releases. The statement composes
  over the releases the ledger admitted: at most that many times the per-sequence bound.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .vocab import MAP_SCOPES

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
    map_scope: str = "device"  # label-subspace: who fitted the subspace, the device alone or the federation's fit phase

    def __post_init__(self):
        if self.release not in RELEASE_MODES:
            raise ValueError(f"release={self.release!r} is not accepted; accepted: {', '.join(RELEASE_MODES)}")
        if self.map_scope not in MAP_SCOPES:
            raise ValueError(f"map_scope={self.map_scope!r} is not accepted; accepted: {', '.join(MAP_SCOPES)}")

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
                        "basis U and the constants released for special tokens) "
                        + ("was derived by each device from the federation's fit phase (every device's noisy statistics "
                           "and reader steps, (fit-epsilon, fit-delta)-DP per sentence: the fit phase's own statement), "
                           "audited on the device's own data before use, and is revealed by the releases. "
                           if self.map_scope == "federation" else
                           "was fitted once on the device's own labelled data and is revealed by the releases: it is "
                           "aggregate information about that data that no bound covers. ")
                        + "The protection against token inversion comes from the projection and "
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


# ------------------------------------------------------------------------------- release budget


class ReleaseBudgetExceeded(ValueError):
    """An instruction would release an example more often than the device's budget allows."""


LEDGER_VERSION = 2


class ReleaseLedger:
    """Per example, the distinct releases a device has made of it: the device's release budget.

    An example is named by a keyed digest of its token ids (:meth:`NoiseKey.example_id
    <privtune_flwr.mechanism.noise_key.NoiseKey.example_id>`), so the ledger holds no text and its
    names mean nothing without the device key. A release is distinct when its configuration (the
    defence's fingerprint) is new for that example, or, with ``release = 'fresh'``, every time.

    :meth:`admit` checks a whole instruction before anything is released: if any example would pass
    ``budget`` distinct releases, nothing is recorded and :class:`ReleaseBudgetExceeded` names the
    budget's key. Otherwise the releases are recorded first (a crash after that over-counts, never
    under-counts).

    ``path`` None keeps the ledger in memory (a simulated device: for the run's lifetime; the
    ClientApp stores :meth:`to_bytes` in its ``context.state``); a path is a deployed device's
    persistent ledger beside its key file, rewritten atomically on every change. A ledger of the
    first format (a list of configurations, with no examples) is read as "every example was
    released under each of them". An unreadable ledger is an error, never a fresh start: that would
    reset the budget.
    """

    def __init__(self, budget: int, path: str | os.PathLike | None = None, *, data: bytes | None = None):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"max-releases-per-example={budget!r} must be an integer >= 1")
        self.budget = budget
        self.path = None if path is None else Path(path).expanduser()
        self._configs: list[str] = []  # fingerprints, indexed by position
        self._every: set[int] = set()  # configurations of an old ledger: assumed for every example
        self._examples: dict[str, dict[int, int]] = {}  # example id -> {configuration: releases}
        if self.path is not None and self.path.exists():
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise ValueError(f"release ledger {self.path} cannot be read ({exc}); the device refuses to release "
                                 "until it can (a lost ledger would reset max-releases-per-example)") from None
        if data:
            self._load(data)

    def _load(self, data: bytes) -> None:
        where = self.path or "in the device state"
        try:
            value = json.loads(data)
            if isinstance(value, list):  # first format: the configurations, no examples
                self._configs = [str(v) for v in value]
                self._every = set(range(len(self._configs)))
                return
            if value.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {value.get('version')!r}")
            self._configs = [str(v) for v in value["configs"]]
            self._every = {int(i) for i in value.get("every", [])}
            self._examples = {str(k): {int(c): int(n) for c, n in v.items()} for k, v in value["examples"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"release ledger {where} is not a ledger this device wrote ({exc}); it refuses to release "
                             "until it is restored or removed by its owner (removing it resets "
                             "max-releases-per-example)") from None

    def to_bytes(self) -> bytes:
        return json.dumps({"version": LEDGER_VERSION, "configs": self._configs, "every": sorted(self._every),
                           "examples": self._examples}, separators=(",", ":")).encode()

    def releases(self, example: str) -> int:
        """Distinct releases of ``example`` so far."""
        own = self._examples.get(example, {})
        return sum(own.values()) + sum(1 for c in self._every if c not in own)

    def most(self) -> int:
        """The most distinct releases of any one example (a per-device bound, at most ``budget``)."""
        return max((self.releases(e) for e in self._examples), default=len(self._every))

    def admit(self, fingerprint: str, examples: list[str], *, fresh: bool = False) -> int:
        """Record one release of each of ``examples`` under ``fingerprint``, or raise
        :class:`ReleaseBudgetExceeded` and record nothing. Returns :meth:`most` afterwards."""
        config = self._configs.index(fingerprint) if fingerprint in self._configs else None
        added: dict[str, int] = {}
        for example in dict.fromkeys(examples):  # a duplicate within one instruction is one release
            own = self._examples.get(example, {})
            known = config is not None and (config in own or config in self._every)
            if fresh or not known:
                added[example] = self.releases(example) + 1
        over = {e: n for e, n in added.items() if n > self.budget}
        if over:
            raise ReleaseBudgetExceeded(
                f"this device refuses to release {len(over)} of the {len(set(examples))} examples asked for: each was "
                f"already released {min(over.values()) - 1} time(s), and its budget is max-releases-per-example="
                f"{self.budget} (node config 'max-releases-per-example'). A new configuration (another epsilon, "
                "defence option or map) or fresh noise would be a new release of the same text, which the cloud "
                "could average with the earlier ones")
        if added:
            if config is None:
                self._configs.append(fingerprint)
                config = len(self._configs) - 1
            for example in added:
                own = self._examples.setdefault(example, {})
                if config in self._every and config not in own:
                    own[config] = 1  # the old ledger's assumed release of it, now explicit
                own[config] = own.get(config, 0) + 1
            self._save()
        return self.most()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.to_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


# -- u-shaped label protection (privtune_flwr.label_protection) -----------------------------------

def label_protection_statement(method: str, *, epsilon: float = 1.0, noise: float = 4.0, num_labels: int = 2) -> str:
    """What the device's label protection of the u-shaped protocol guarantees, in one sentence.

    * ``randomised-response``: each example's label is ``epsilon``-label-DP (Ghazi et al. 2021):
      the device draws the label it trains on once per example by randomised response over the
      prior's top-k classes (k <= ``num_labels``; P(true label kept) = e^eps / (e^eps + k - 1)),
      and everything the cloud receives (the gradients of every step, any epoch) is
      post-processing of that draw. Nothing is claimed about the representations, whose
      guarantee is the defence's own.
    * ``max-norm`` / ``marvell``: empirical only. The attacks of ``simulations.label_leakage``
      (direction, norm, learned) are what is measured; noise is fresh per step, so an example's
      gradients over several epochs average and leak more than one step's.
    * ``none``: nothing; the returned gradient reveals the labels (97.5-100% recovered).
    """
    import math

    if method == "randomised-response":
        k = max(2, num_labels)
        keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
        return (f"label-DP: each example's label is {epsilon:g}-label-DP (randomised response with prior, drawn once "
                f"per example; P(keep) = {keep:.3f} at k={k}); gradients and head are post-processing of it")
    if method == "marvell":
        return (f"empirical only: max-norm plus Gaussian noise of {noise:g} x ||class-mean difference|| along it, fresh "
                "per step; no DP guarantee (measured by simulations.label_leakage)")
    if method == "max-norm":
        return ("empirical only: every returned gradient padded with Gaussian noise to the batch's largest norm; hides "
                "norms, not directions; no DP guarantee")
    return "none: the returned gradients reveal the labels"


def federated_map_statement(cfg, *, fit_epsilon: float | None = None, fit_delta: float | None = None) -> str:
    """What the cloud learns from the fit phase of the federation's label map
    (``defense.label-subspace.fit-scope = "federation"``, :mod:`privtune_flwr.federated_map` and
    :mod:`privtune_flwr.federated_reader`), in words.

    Each device sends once, before round 1, its per-class token counts and sums, the sum of its
    tokens' outer products and per special id a count and a sum, every token clipped to norm
    ``defense.label-subspace.fit-clip``, with Gaussian noise calibrated on the device to its own floor
    (``fit-epsilon``, ``fit-delta``; the cloud does not choose them) for adding or removing one of
    its sentences (at most ``model.max-length`` tokens). With ``defense.label-subspace.fit-rounds`` > 0 it then takes
    ``rounds x steps`` full-batch reader steps, each sentence's gradient clipped to
    ``defense.label-subspace.fit-grad-clip`` and Gaussian noise added to their sum, and sends the change of the
    weights after each round (``fit-optimizer = "cloud"``: one such noisy sum a round, which it sends;
    the cloud's Adam steps on the devices' sums are post-processing). The statistics and the steps share the floor (half of ``mu^2`` each,
    in Gaussian DP, which composes exactly): the whole fit phase of a device is (fit-epsilon,
    fit-delta)-DP per sentence. This composes with the releases' own guarantee (a sentence's total
    is the sum of both). The sum and the final weights reveal the federation's aggregate label map,
    as the releases do in any case. With ``fit-epsilon = inf`` a device sends its statistics and
    changes without noise and the cloud learns them exactly."""
    if fit_epsilon is None or fit_delta is None:
        budget, floor = "(fit-epsilon, fit-delta)", ", by the device's own floor (defaults 64 and 1e-05)"
    else:
        budget, floor = f"({fit_epsilon:g}, {fit_delta:g})", ""
    rounds = int(getattr(cfg, "subspace_fit_rounds", 0))
    clip = f"each sentence's gradient clipped to {cfg.subspace_fit_grad_clip:g}, Gaussian noise on their sum"
    if rounds == 0:
        reader = ""
    elif getattr(cfg, "subspace_fit_optimizer", "device") == "cloud":
        reader = f", then in each of {rounds} rounds one full-batch reader gradient sum ({clip}) that it sent"
    else:
        reader = (f", then {rounds} rounds of {int(cfg.subspace_fit_steps)} full-batch reader steps ({clip}) whose "
                  "weight changes it sent")
    return (f"fit phase (defense.label-subspace.fit-scope='federation'): each device sent once its clipped (token norm <= "
            f"{cfg.subspace_fit_clip:g}) per-class token counts, sums and second moments with Gaussian noise{reader}; "
            f"together {budget}-DP per sentence of at most {cfg.max_length} tokens{floor}; the cloud learns their noisy "
            "sums (the federation's label map) and nothing exact about any one device; this adds to each sentence's "
            "release guarantee")
