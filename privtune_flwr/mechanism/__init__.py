"""The PrivTune mechanism: d_chi noise, vocabulary anchors and rings, importance, PGD, release.

* ``dchi``: the d_chi sampler (§2.1);
* ``anchors``: anchors, k-NN graph, n-hop rings, targets, their caches, ``nearest_anchor`` and the
  device's ``self_audit`` (§2.2);
* ``importance``: TF-IDF + entropy token importance (§2.4);
* ``pgd``: the OPT-1/OPT-3 mean shift (§2.3);
* ``gaussian``: analytic Gaussian calibration for the DP-Forward baseline (§3).
"""

from .anchors import AnchorTables, get_tables, nearest_anchor, self_audit
from .dchi import check_epsilon, sample_dchi
from .gaussian import analytic_gaussian_sigma, gaussian_delta
from .importance import Importance
from .pgd import solve_shift

__all__ = [
    "AnchorTables", "Importance", "analytic_gaussian_sigma", "check_epsilon", "gaussian_delta",
    "get_tables", "nearest_anchor", "sample_dchi", "self_audit", "solve_shift",
]
