"""d_chi-privacy noise (Feyisetan et al., WSDM 2020): density proportional to exp(-eps * ||z||_2).

A draw is a uniformly random direction times a Gamma(d, rate=eps) magnitude, so
``E||z|| = d / eps`` and ``sd(||z||) = sqrt(d) / eps``. Every token gets its own direction *and*
its own magnitude: sharing one magnitude across a batch, or drawing per-coordinate
Laplace/Gamma-times-uniform noise, gives a different (and weaker) mechanism.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .noise_key import gamma_many


def check_epsilon(epsilon: float) -> float:
    """Return ``epsilon`` as a float, or raise if it is not a finite number > 0."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon={epsilon!r} is not a number; accepted: a finite value > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"epsilon={epsilon!r} is outside the accepted range (0, inf)")
    return value


def sample_dchi(
    shape: tuple[int, ...],
    dim: int,
    epsilon: float,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Independent d_chi draws, one per index of ``shape``: a tensor ``[*shape, dim]``.

    Units are those of the representation space; ``epsilon`` is per unit of Euclidean distance.
    The same ``generator`` state gives the same draws; the global RNG is never touched when a
    generator is given.
    """
    epsilon = check_epsilon(epsilon)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim={dim!r} must be an integer >= 1")
    shape = tuple(int(s) for s in shape)
    # One in-place Gaussian fill and one in-place rescale: the fill is most of the cost, so the
    # direction normalisation and the magnitude share a single [*shape] scale factor.
    noise = torch.empty(*shape, dim, dtype=torch.float32).normal_(generator=generator)
    magnitude = torch.from_numpy(_gamma(shape, float(dim), generator) / epsilon).to(torch.float32)
    scale = magnitude / torch.linalg.vector_norm(noise, dim=-1).clamp_min(1e-12)
    noise.mul_(scale.unsqueeze(-1))
    return noise.to(dtype=dtype, device=device)


def dchi_from_stream(stream, count: int, dim: int, epsilon: float) -> torch.Tensor:
    """``count`` independent d_chi draws ``[count, dim]`` from one example's keyed
    :class:`~privtune_flwr.mechanism.noise_key.NoiseStream` (directions first, then magnitudes:
    the same draws as that example's row in :func:`sample_dchi_keyed`)."""
    epsilon = check_epsilon(epsilon)
    noise = stream.normal((int(count), int(dim)))
    scale = stream.gamma(int(count), float(dim)).to(torch.float32)  # the same rounding as the batched path
    scale.div_(torch.linalg.vector_norm(noise, dim=-1).clamp_min_(1e-12)).div_(epsilon)
    return noise.mul_(scale.unsqueeze(-1))


def real_spans(attention_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """``(start, count)`` of each row's real tokens when they are contiguous (right or left
    padding), else None."""
    mask = attention_mask.bool()
    counts = mask.sum(1)
    starts = mask.int().argmax(1)
    pos = torch.arange(mask.shape[1])
    inside = (pos >= starts.unsqueeze(1)) & (pos < (starts + counts).unsqueeze(1))
    if not torch.equal(inside, mask):
        return None
    return list(zip(starts.tolist(), counts.tolist()))


def sample_dchi_keyed(streams, attention_mask: torch.Tensor, dim: int, epsilon: float,
                      spans: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """d_chi noise at the real positions of ``attention_mask``, row ``b`` drawn from ``streams[b]``
    (directions first, then magnitudes), so an example's noise does not depend on its batch.

    Returned factored, ``(gaussian [B, T, dim], scale [B, T])``, noise = gaussian * scale (zero at
    padding), so that a caller can fold further scaling and the addition into one pass. ``spans``:
    :func:`real_spans` of the mask, if the caller has it."""
    epsilon = check_epsilon(epsilon)
    b_size, t_size = attention_mask.shape
    spans = real_spans(attention_mask) if spans is None else spans
    if spans is None:  # an unusual mask: draw per row and scatter
        rows = [dchi_from_stream(st, n, dim, epsilon) for st, n in zip(streams, attention_mask.bool().sum(1).tolist())]
        out = torch.zeros(b_size, t_size, dim)
        if rows:
            out[attention_mask.bool()] = torch.cat(rows)
        return out, attention_mask.to(torch.float32)
    noise = torch.empty(b_size, t_size, dim)
    for stream, row, (start, count) in zip(streams, noise, spans):
        if count < t_size:  # padding: zero, never left uninitialised
            row[:start].zero_()
            row[start + count:].zero_()
        if count:
            stream.normal_(row[start:start + count])
    scale = torch.zeros(b_size, t_size)
    counts = [n for _, n in spans]
    for row, (start, count), magnitude in zip(scale, spans, gamma_many(list(streams), counts, float(dim))):
        row[start:start + count] = magnitude
    scale.div_(torch.linalg.vector_norm(noise, dim=-1).clamp_min_(1e-12)).div_(epsilon)
    return noise, scale


def _gamma(shape: tuple[int, ...], concentration: float, generator: torch.Generator | None) -> np.ndarray:
    """Gamma(concentration, rate=1) draws in float64, seeded from ``generator``.

    torch's Gamma sampler only reads the global RNG; numpy's takes an explicit seed, so the draws
    follow ``generator`` without side effects on anyone else's randomness.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed).standard_gamma(concentration, size=shape)
