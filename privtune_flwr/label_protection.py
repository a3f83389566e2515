"""Label protection on the u-shaped path: what the device does to the gradient it sends back.

In the u-shaped protocol the device keeps its labels, but the gradient of its loss with respect to
the cloud's outputs carries them: for a classifier it is ``(p - onehot(y))`` pulled back through the
head, so its direction (and, when classes are fitted unequally, its norm) gives the label away
(Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022;
``privtune_flwr.attacks.gradient``). The device can transform what it returns:

``none``
    the exact gradient (the labels leak: docs/privacy.md, "Labels in the u-shaped protocol").
``max-norm``
    Li et al.'s heuristic: each example's gradient gets isotropic Gaussian noise on the gradient's
    support so that its expected squared norm equals the largest in the batch (hides the norm,
    not the direction).
``marvell``
    a *simplified* Marvell (Li et al.'s optimised noise, stated here as what is built): max-norm,
    plus zero-mean Gaussian noise along the batch's class-mean difference ``u = mu_1 - mu_0``
    (known to the device, which holds the labels) with standard deviation ``label-noise * ||u||``.
    Along ``u``, the one direction in which the two classes differ in mean, the classes then
    overlap: an attacker projecting on any direction separates them at most as a Gaussian shift of
    ``1 / label-noise`` standard deviations does (AUC <= Phi(1 / (sqrt(2) label-noise)) for that
    component). Marvell proper solves for the noise covariances per class under a power budget;
    this keeps its one-direction structure for two classes (and uses the top class-mean
    direction against the rest for more classes). The guarantee is empirical.
``randomised-response``
    label DP (Ghazi et al., "Deep Learning with Label Differential Privacy", NeurIPS 2021,
    RR-with-prior): the label the device trains on (head and returned gradient alike) is drawn
    once per example by randomised response with parameter ``label-epsilon``, over the ``k``
    most probable classes under a prior (uniform unless given: a prior the device computed from
    the same labels would itself leak). Everything the cloud receives is post-processing of the
    randomised label, so each example's label is ``label-epsilon``-label-DP. The draw is keyed by
    the device's noise key and the example's tokens (release once: the same example gets the same
    randomised label every epoch, so repetition gives the cloud nothing).

The gradient noise is fresh per step and comes from the device's noise key with a nonce from OS
entropy; never from anything the cloud chooses.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

METHODS = ("none", "max-norm", "marvell", "randomised-response")
# The device floor's order (privtune_flwr.device_policy 'min-label-protection'): by what the
# attacks of simulations.label_leakage recover (docs/privacy.md, "Labels in the u-shaped protocol").
# randomised-response stands beside the ladder: accepted for any floor when its epsilon is at
# most the device's max-label-epsilon.
STRENGTH = {"none": 0, "max-norm": 1, "marvell": 2}
GRADIENT_METHODS = ("max-norm", "marvell")
_RR_CONTEXT = b"privtune/label-rr/v1"
_NOISE_CONTEXT = b"privtune/label-gradient-noise/v1"


def check_parameters(method: str, epsilon: float, noise: float) -> None:
    """Raise ValueError naming the key and its accepted range."""
    if method not in METHODS:
        raise ValueError(f"label-protection.method={method!r} is outside the accepted range: {', '.join(METHODS)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon) and 0 < epsilon <= 64):
        raise ValueError(f"label-protection.epsilon={epsilon!r} is outside the accepted range: (0, 64] "
                         "(randomised response's epsilon)")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and 0 < noise <= 1000):
        raise ValueError(f"label-protection.noise={noise!r} is outside the accepted range: (0, 1000] "
                         "(marvell's noise along the class-mean difference, in units of its norm)")


def rr_keep_probability(epsilon: float, k: int) -> float:
    """Randomised response over ``k`` classes: the probability of reporting the true label."""
    return math.exp(epsilon) / (math.exp(epsilon) + k - 1)


def rr_with_prior_k(epsilon: float, prior: torch.Tensor) -> int:
    """Ghazi et al.'s RRWithPrior: the k maximising ``keep(eps, k) * (mass of the top-k classes)``."""
    top = torch.sort(prior.double(), descending=True).values
    best_k, best = 1, -1.0
    for k in range(1, len(top) + 1):
        value = rr_keep_probability(epsilon, k) * float(top[:k].sum())
        if value > best + 1e-12:
            best_k, best = k, value
    return best_k


@dataclass
class LabelProtection:
    method: str = "none"
    epsilon: float = 1.0  # randomised-response
    noise: float = 4.0  # marvell
    num_labels: int = 2
    prior: torch.Tensor | None = None  # randomised-response: public prior over classes (None: uniform)
    key: object = None  # privtune_flwr.mechanism.noise_key.NoiseKey; None: a fresh key from OS entropy

    def __post_init__(self):
        check_parameters(self.method, self.epsilon, self.noise)
        if self.prior is not None:
            self.prior = torch.as_tensor(self.prior, dtype=torch.float64)
            if self.prior.shape != (self.num_labels,) or (self.prior < 0).any() or float(self.prior.sum()) <= 0:
                raise ValueError(f"label prior {self.prior.tolist()} must be {self.num_labels} non-negative weights")
            self.prior = self.prior / self.prior.sum()

    def _key(self):
        if self.key is None:
            from .mechanism.noise_key import NoiseKey

            self.key = NoiseKey.fresh()
        return self.key

    # -- label DP -------------------------------------------------------------------------------
    def randomise_labels(self, labels: torch.Tensor, token_ids: list[list[int]] | None = None) -> torch.Tensor:
        """The labels the device trains on: randomised response (RR-with-prior) per example,
        keyed by the example's tokens (the same example always gets the same answer); other
        methods return ``labels`` unchanged."""
        if self.method != "randomised-response":
            return labels
        labels = torch.as_tensor(labels, dtype=torch.long)
        prior = torch.full((self.num_labels,), 1.0 / self.num_labels, dtype=torch.float64) if self.prior is None else self.prior
        k = rr_with_prior_k(self.epsilon, prior)
        top = torch.sort(prior, descending=True, stable=True).indices[:k].tolist()
        keep = rr_keep_probability(self.epsilon, k)
        key = self._key()
        out = labels.clone()
        context = _RR_CONTEXT + f"|{self.epsilon!r}|{self.num_labels}|{top}".encode()
        for i, y in enumerate(labels.tolist()):
            if token_ids is None:  # no example identity: a fresh draw
                stream = key.stream(context, [i], nonce=secrets.token_bytes(16))
            else:
                stream = key.stream(context, token_ids[i])
            u, v = (float(x) for x in stream.uniform((2,)))
            if y in top:
                if u < keep:
                    out[i] = y
                else:
                    others = [c for c in top if c != y]
                    out[i] = others[min(int(v * len(others)), len(others) - 1)]
            else:  # outside the prior's top k: uniform over the top k
                out[i] = top[min(int(v * k), k - 1)]
        return out

    # -- gradient noise -------------------------------------------------------------------------
    def protect_gradient(self, grad: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient ``[N, T, d]`` the device returns. ``labels [N]`` (classification; the labels
        the loss used) let marvell find the class-mean difference; for generation (None) marvell
        is max-norm. Noise goes on the gradient's support only: the positions where some example
        of the batch has a non-zero gradient (for an encoder classifier, the first token), which
        depends on the model and the mask, not on the labels."""
        if self.method not in GRADIENT_METHODS:
            return grad
        n = grad.shape[0]
        support = (grad != 0).any(dim=2).any(dim=0)  # [T]
        if mask is not None:
            support = support & mask.bool().any(0)
        if n == 0 or not bool(support.any()):
            return grad
        flat = grad[:, support].reshape(n, -1).double()  # [N, D]
        dim = flat.shape[1]
        stream = self._key().stream(_NOISE_CONTEXT, [n, dim], nonce=secrets.token_bytes(16))
        norms2 = (flat ** 2).sum(1)
        sigma = torch.sqrt((norms2.max() - norms2).clamp_min(0) / dim)  # max-norm: E||g + noise||^2 = max ||g||^2
        noisy = flat + sigma[:, None] * stream.normal((n, dim)).double()
        if self.method == "marvell" and labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            classes = labels.unique()
            if len(classes) >= 2:
                counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
                top = int(counts.argmax())  # the largest class against the rest
                diff = flat[labels == top].mean(0) - flat[labels != top].mean(0)
                scale = float(diff.norm())
                if scale > 0:
                    u = diff / scale
                    z = stream.normal((n,)).double()
                    noisy = noisy + (self.noise * scale * z)[:, None] * u[None, :]
        out = grad.clone()
        out[:, support] = noisy.reshape(n, int(support.sum()), grad.shape[2]).to(grad.dtype)
        return out

    def statement(self) -> str:
        from .accounting import label_protection_statement

        return label_protection_statement(self.method, epsilon=self.epsilon, noise=self.noise, num_labels=self.num_labels)


def from_config(cfg, *, key=None, prior=None) -> LabelProtection:
    """The device's protection for run config ``cfg`` (its keys are checked by RunConfig)."""
    return LabelProtection(cfg.label_protection, epsilon=cfg.label_epsilon, noise=cfg.label_noise,
                           num_labels=cfg.num_labels if cfg.task == "classification" else 0, prior=prior, key=key)
