"""Analytic Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8), calibrated by bisection.

For sensitivity ``D`` and noise ``N(0, sigma^2 I)`` the mechanism is (eps, delta)-DP exactly when
``Phi(D/(2 sigma) - eps sigma/D) - e^eps Phi(-D/(2 sigma) - eps sigma/D) <= delta``; the left side
falls monotonically in sigma, so the smallest valid sigma is found by bisection.
"""

from __future__ import annotations

import math

from scipy.special import log_ndtr, ndtr


def check_delta(delta: float) -> float:
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta={delta!r} is not a number; accepted: 0 < delta < 1") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta={delta!r} is outside the accepted range (0, 1)")
    return value


def gaussian_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (float)."""
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # The second term in log space: e^eps overflows long before the product does.
    return float(ndtr(a - b) - math.exp(epsilon + float(log_ndtr(-a - b))))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float, *, rel_tol: float = 1e-10) -> float:
    """Smallest sigma (units of the sensitivity) giving (epsilon, delta)-DP for L2 ``sensitivity``."""
    from .dchi import check_epsilon

    epsilon, delta = check_epsilon(epsilon), check_delta(delta)
    if not sensitivity > 0 or not math.isfinite(sensitivity):
        raise ValueError(f"sensitivity={sensitivity!r} is outside the accepted range (0, inf)")
    lo = hi = sensitivity
    while gaussian_delta(epsilon, hi, sensitivity) > delta:
        hi *= 2.0
    while gaussian_delta(epsilon, lo, sensitivity) <= delta and lo > 1e-12 * sensitivity:
        lo /= 2.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if gaussian_delta(epsilon, mid, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork & Roth's sigma = D sqrt(2 ln(1.25/delta)) / eps (valid for eps < 1), for comparison."""
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
