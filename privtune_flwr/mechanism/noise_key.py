"""The device's secret noise key, and the per-example noise streams derived from it.

The cloud is the adversary, so nothing it can know or choose may determine the noise: not the
run config, not the round, not a message id. A device draws a 256-bit key from OS entropy
(``secrets``) once, never sends or logs it, and derives the noise of each example from

    HMAC-SHA256(key, mechanism fingerprint || the example's token ids [|| a fresh nonce])

* **release once** (the default, no nonce): the noise of an example is a pure function of the key,
  the mechanism's configuration and the example's tokens. Sending the example again (a later
  epoch, round or evaluation) sends the bit-identical tensor: post-processing of one release, so
  nothing new leaks and averaging over rounds gains the cloud nothing. Identical texts get
  identical releases, so the cloud learns which examples are duplicates of each other.
* **fresh** (a 16-byte nonce from OS entropy per release): independent noise every time; each
  release then composes (``privtune_flwr.accounting``).

Why not ``torch.Generator.manual_seed``: torch's CPU generator is MT19937 and ``manual_seed``
keeps only the low 32 bits of the seed (seeds ``s`` and ``s + 2**32`` give the same draws), so a
seed is searchable. A stream here loads the generator's whole 19,937-bit state from a SHAKE-256
expansion of the keyed digest (numpy's Philox keyed with 128 bits of the digest stands in if
torch's state layout is ever not the known one). The generators are fast but not cryptographic;
the secrecy rests on the key and the keyed hash, and one example's stream says nothing about
another's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

KEY_BYTES = 32
_DOMAIN = b"privtune-flwr/noise/v1"
_SEED_DOMAIN = b"privtune-flwr/reproducible-seed/v1"
_EXAMPLE_DOMAIN = b"privtune-flwr/example-id/v1"
_MT_WORDS = 624


def _mt_template() -> tuple[np.ndarray, slice] | None:
    """A CPU generator state to copy, and where its 624 MT19937 words sit; None if the layout is
    not the one this module knows (then streams fall back to numpy's Philox for every draw)."""
    state = torch.Generator().manual_seed(1).get_state().numpy().copy()
    words = slice(24, 24 + 8 * _MT_WORDS)
    if state.size != 5056 or np.frombuffer(state[:8].tobytes(), np.uint64)[0] != 1:
        return None
    probe = state.copy()
    probe[words] = np.frombuffer(np.arange(1, _MT_WORDS + 1, dtype=np.uint64).tobytes(), np.uint8)
    a, b = torch.Generator(), torch.Generator()
    try:
        a.set_state(torch.from_numpy(probe))
        b.set_state(torch.from_numpy(state))
    except RuntimeError:
        return None
    if torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b)):
        return None  # the words were not where we wrote them
    return state, words


_TEMPLATE = _mt_template()
if _TEMPLATE is None:  # pragma: no cover - depends on the installed torch
    log.warning("unknown torch generator layout: noise streams use numpy's Philox (slower)")


class NoiseStream:
    """Random draws for one example, from one keyed digest. Draw in a fixed order."""

    __slots__ = ("_digest", "_torch", "_numpy")

    def __init__(self, digest: bytes):
        self._digest = digest
        self._torch: torch.Generator | None = None
        self._numpy: np.random.Generator | None = None

    @property
    def numpy(self) -> np.random.Generator:
        if self._numpy is None:
            key = int.from_bytes(hashlib.shake_256(b"philox" + self._digest).digest(16), "little")
            self._numpy = np.random.Generator(np.random.Philox(key=key))
        return self._numpy

    @property
    def torch(self) -> torch.Generator | None:
        if self._torch is None and _TEMPLATE is not None:
            state, words = _TEMPLATE
            state = state.copy()
            expanded = np.frombuffer(hashlib.shake_256(b"mt19937" + self._digest).digest(4 * _MT_WORDS), "<u4")
            state[words] = expanded.astype("<u8").view(np.uint8)
            state[:8] = 0  # the "initial seed" field is never read by the draws; keep it blank
            self._torch = torch.Generator()
            self._torch.set_state(torch.from_numpy(state))
        return self._torch

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal float32 draws."""
        return self.normal_(torch.empty(shape, dtype=torch.float32))

    def normal_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (a contiguous float32 view) with standard normal draws, in place."""
        gen = self.torch
        if gen is None:
            out.copy_(torch.from_numpy(self.numpy.standard_normal(tuple(out.shape), dtype=np.float32)))
            return out
        return out.normal_(generator=gen)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform [0, 1) float32 draws."""
        gen = self.torch
        if gen is None:
            return torch.from_numpy(self.numpy.random(shape, dtype=np.float32))
        return torch.rand(shape, generator=gen)

    def gamma(self, count: int, shape: float) -> torch.Tensor:
        """``count`` Gamma(shape, rate 1) draws, float64 (``shape >= 1``); see :func:`gamma_many`."""
        return gamma_many([self], [count], shape)[0]


def gamma_many(streams: list[NoiseStream], counts: list[int], shape: float) -> list[torch.Tensor]:
    """Gamma(shape, rate 1) draws, float64: ``counts[i]`` of them from ``streams[i]``.

    Marsaglia and Tsang's exact rejection sampler on each stream's own generator, vectorised over
    all streams (a numpy generator per example would cost more than the Gaussian draws). Each
    stream draws its proposals, then retries its own rejections, in the same order whatever the
    other streams are, so an example's draws do not depend on its batch. A proposal is accepted
    with probability above 0.99 for the shapes used here (d >= 16).
    """
    if shape < 1:
        raise ValueError(f"gamma shape={shape!r} must be >= 1")
    if not streams:
        return []
    if streams[0].torch is None:
        return [torch.from_numpy(st.numpy.standard_gamma(shape, size=n)) for st, n in zip(streams, counts)]
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)

    def propose(gen, n):
        return torch.randn(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)

    def accept(x, u):
        v = (1.0 + c * x).pow(3)
        return (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300))), d * v

    drawn = [propose(st.torch, n) for st, n in zip(streams, counts)]
    ok, value = accept(torch.cat([x for x, _ in drawn]), torch.cat([u for _, u in drawn]))
    out = list(value.split(list(counts)))
    for st, good, row in zip(streams, ok.split(list(counts)), out):
        todo = torch.nonzero(~good).squeeze(1)
        while todo.numel():  # rare: this stream's own retries, in order
            good, val = accept(*propose(st.torch, todo.numel()))
            row[todo[good]] = val[good]
            todo = todo[~good]
    return out


class NoiseKey:
    """A device's secret. ``repr`` never shows it, and it refuses to be pickled (so it cannot be
    put into a message or a checkpoint by accident)."""

    __slots__ = ("_secret", "reproducible", "source")

    def __init__(self, secret: bytes, *, reproducible: bool = False, source: str = "memory"):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise ValueError(f"a noise key needs at least 16 secret bytes; got {type(secret).__name__} of length "
                             f"{len(secret) if isinstance(secret, (bytes, bytearray)) else 'n/a'}")
        self._secret = bytes(secret)
        self.reproducible = bool(reproducible)
        self.source = source

    @classmethod
    def fresh(cls) -> "NoiseKey":
        """A new key from OS entropy: unpredictable to anyone else."""
        return cls(secrets.token_bytes(KEY_BYTES), source="os-entropy")

    @classmethod
    def from_seed(cls, seed: int | str) -> "NoiseKey":
        """A key anyone who knows ``seed`` can rebuild: for research reproducibility only."""
        if isinstance(seed, bool) or not isinstance(seed, (int, str)):
            raise ValueError(f"seed={seed!r} must be an integer or a string")
        digest = hashlib.sha256(_SEED_DOMAIN + str(seed).encode()).digest()
        return cls(digest, reproducible=True, source=f"seed {seed!r}")

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "NoiseKey":
        """The key kept in ``path`` (created, readable by this user only, on first use).

        Creation is atomic (written to a private temporary file, then hard-linked into place), so
        two processes starting together agree on one key and a crash never leaves half a key.
        """
        path = Path(path).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(KEY_BYTES) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass  # another process created it first: use theirs
            finally:
                os.unlink(tmp)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"noise key file {path} has mode {oct(mode)}; it must be readable by its owner only "
                                  f"(chmod 600 {path})")
        text = path.read_text().strip()
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"noise key file {path} does not hold a hex key") from None
        return cls(secret, source=f"file {path}")

    def to_state(self) -> bytes:
        """The secret, for the device's own storage (a simulated device's ``context.state``)."""
        return self._secret

    @classmethod
    def from_state(cls, secret: bytes, *, source: str = "device state") -> "NoiseKey":
        return cls(secret, source=source)

    def stream(self, context: bytes, token_ids, nonce: bytes = b"") -> NoiseStream:
        """The stream for one example: ``context`` names the mechanism configuration, ``token_ids``
        are the example's real tokens (padding excluded), ``nonce`` makes the release fresh."""
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
        message = b"".join((_DOMAIN, len(context).to_bytes(4, "little"), context, ids.tobytes(), nonce))
        return NoiseStream(hmac.new(self._secret, message, hashlib.sha256).digest())

    def example_id(self, token_ids) -> str:
        """The name of one example in the device's release ledger: a keyed digest of its real token
        ids (128 bits, hex). Without the key it says nothing about the text."""
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
        return hmac.new(self._secret, _EXAMPLE_DOMAIN + ids.tobytes(), hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"NoiseKey(<secret>, source={self.source!r}, reproducible={self.reproducible})"

    def __reduce__(self):
        raise TypeError("a NoiseKey never leaves the device: it cannot be pickled")

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self
