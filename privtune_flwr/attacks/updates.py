"""What the cloud reads from one device's offsite-tuning update (``protocol = "offsite"``).

In offsite tuning no representation leaves a device: it returns its LoRA adapters (and the task
head) after ``offsite.local-steps`` steps on its own data. The cloud holds the adapters it sent,
so it has the update. Two attacks on it, one on the first adapter block and one on the head.
An encoder's block input carries the position, so its token attack recovers (token, position)
pairs (:func:`attack_update`); a decoder's does not (rotary positions act after the
projection), so its attack recovers the batch's set of tokens (:func:`attack_tokens`):

* **Token recovery (span check on the first block's LoRA ``A``).** The input of block 0's
  query and value projections is the embedding layer's output for (token, position), which no
  training changes. LoRA's ``A`` gradient is ``s B^T sum_t g_t x_t^T``: its rows lie in the span
  of the inputs ``x_t`` of the batch's real tokens. The attacker takes the row space of the
  returned ``A`` minus the sent ``A`` and scores every (vocabulary token, position) by the share
  of its input's energy that lies in that space. The device trains with dropout on that input
  (public: the model's config), so the span holds ``x * mask / (1 - p)``, which misses the clean
  ``x`` on the dropped coordinates; the best candidates are re-scored by their residual once
  their worst-fitting ``p`` of coordinates are set aside, and the ``n`` lowest are the guess,
  ``n`` being the victim's number of real tokens (the update's numerical rank gives it when the
  LoRA rank is not the cap). Gradient-inversion attacks on language models that test candidate inputs against the span of a
  first-layer gradient are the model for it; here it runs through the device's real training code,
  AdamW included.

  - ``passive``: the run's own configuration (LoRA rank 8, ``train.learning-rate``, the local
    steps) and adapters that training produced. AdamW divides each coordinate by its own scale,
    which bends the rows out of the span, and rank 8 holds at most 16 of the input directions
    (query and value).
  - ``active``: the cloud chooses what the protocol lets it choose: the run config (a LoRA rank
    above the batch's token count, one local step, the batch size) and the adapters it sends
    (block 0's ``A`` zero and its ``B`` of scale 1e-12). The gradient is then far below AdamW's
    epsilon, where its step is linear in the gradient, so the returned ``A`` is the gradient,
    scaled. A device checks the adapters' keys, shapes and finiteness; all of these pass.

* **Label inference from the head.** The head's bias gradient is ``sum (p - onehot(y))``; the
  attacker guesses the batch's majority label as the class whose bias rose most.

The blind floor is the same guess from public text only: the ``n`` most frequent (token, position)
pairs (a decoder: tokens) of the auxiliary corpus, and the majority label of the attacker's
auxiliary labelled data. A generation task has no head to read (its ``lm_head`` is frozen).

The experiment that measures them over many victims: ``python -m simulations.offsite_attacks``.
"""

from __future__ import annotations

from collections import Counter

import torch

from .. import offsite

ACTIVE_B_SCALE = 1e-12  # the active cloud's block-0 LoRA B: its gradient stays far below AdamW's eps (1e-8)
ENERGY_CHUNK = 4096  # candidate tokens scored at a time


def first_block_keys(off: offsite.Offsite, part: str) -> list[str]:
    """Canonical adapter keys of block 0's LoRA ``part`` (``lora_A`` or ``lora_B``)."""
    attr = "layer" if off.family == "encoder" else "layers"
    return [k for k in off.adapter_spec() if f".{attr}.0." in k and f".{part}." in k]


def head_bias_key(off: offsite.Offsite) -> str:
    keys = [k for k in off.adapter_spec() if k.endswith("bias") and ("classifier" in k or "score" in k)]
    if len(keys) != 1:
        raise ValueError(f"expected one head bias among the adapters, found {keys}")
    return keys[0]


def row_space(delta_rows: torch.Tensor, rel_tol: float = 1e-5) -> torch.Tensor:
    """An orthonormal basis (columns) of the rows' span: the singular directions above
    ``rel_tol`` of the largest singular value (float32 updates: their rounding sits near 1e-7;
    tokens whose gradient is weak sit at 1e-4 of the strongest)."""
    if delta_rows.numel() == 0 or float(delta_rows.abs().max()) == 0.0:
        return delta_rows.new_zeros((delta_rows.shape[1], 0))
    _, s, vh = torch.linalg.svd(delta_rows.double(), full_matrices=False)
    keep = int((s > rel_tol * s[0]).sum())
    return vh[:keep].T.contiguous()


@torch.no_grad()
def block_inputs(off: offsite.Offsite, token_ids: torch.Tensor, position: int) -> torch.Tensor:
    """The input of block 0's attention projections for each token at ``position``, as the
    emulator computes it in evaluation mode (no dropout): [len(token_ids), hidden]."""
    model = offsite._base(off.emulator.base_model.model)
    ids = token_ids.view(-1, 1)
    was = model.training
    model.eval()  # the clean input: the attacker sets the device's dropout aside itself
    try:
        if off.family == "encoder":
            pos = torch.full_like(ids, position)
            return model.embeddings(input_ids=ids, position_ids=pos, token_type_ids=torch.zeros_like(ids))[:, 0].float()
        hidden = model.embed_tokens(ids)
        return model.layers[0].input_layernorm(hidden)[:, 0].float()  # rotary positions act after the projection
    finally:
        model.train(was)


@torch.no_grad()
def span_scores(off: offsite.Offsite, basis: torch.Tensor, positions: int, candidates: torch.Tensor) -> torch.Tensor:
    """[positions, len(candidates)]: the share of each candidate input's energy in the span
    (1 for an input in the span, about dim / hidden for a random one). A decoder's inputs do not
    depend on the position: its rows repeat."""
    q = basis.float()
    out = torch.empty(positions, len(candidates))
    for p in range(positions):
        if p and off.family != "encoder":
            out[p] = out[0]
            continue
        for at in range(0, len(candidates), ENERGY_CHUNK):
            x = block_inputs(off, candidates[at:at + ENERGY_CHUNK], p)
            out[p, at:at + len(x)] = (x @ q).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-12)
    return out


@torch.no_grad()
def trimmed_residuals(basis: torch.Tensor, x: torch.Tensor, drop: float, iterations: int = 3) -> torch.Tensor:
    """The residual share of each row of ``x`` outside the span once its ``drop`` worst-fitting
    coordinates are set aside (refitted ``iterations`` times): a device that trains with dropout
    sends the span of ``x * mask / (1 - drop)``, which misses ``x`` on the dropped coordinates only,
    so a present input fits the rest exactly."""
    q = basis.float()
    keep = torch.ones_like(x, dtype=torch.bool)
    trim = int(round(drop * x.shape[1]))
    target = x / (1.0 - drop)
    for _ in range(iterations + 1):
        w = keep.float()
        a = q.unsqueeze(0) * w.unsqueeze(-1)  # [m, hidden, dim]: the span's rows on the kept coordinates
        c = torch.linalg.lstsq(a, (target * w).unsqueeze(-1)).solution  # [m, dim, 1]
        resid = (target - (q @ c).squeeze(-1)).pow(2)
        if trim == 0:
            break
        keep = torch.ones_like(keep)
        keep.scatter_(1, torch.topk(resid, trim, dim=1).indices, False)
    return (resid * keep).sum(1) / (target.pow(2) * keep).sum(1).clamp_min(1e-12)


def real_pairs(ids: torch.Tensor, mask: torch.Tensor, special: set[int]) -> set[tuple[int, int]]:
    """The batch's (token, position) pairs, special tokens left out."""
    pairs = set()
    for row, m in zip(ids.tolist(), mask.tolist()):
        for pos, (tok, keep) in enumerate(zip(row, m)):
            if keep and tok not in special:
                pairs.add((tok, pos))
    return pairs


def real_tokens(ids: torch.Tensor, mask: torch.Tensor, special: set[int]) -> set[int]:
    """The batch's distinct tokens, special tokens left out."""
    return {tok for tok, _ in real_pairs(ids, mask, special)}


def frequent_tokens(off: offsite.Offsite, texts: list[str], max_length: int, special: set[int]) -> list[int]:
    """Tokens of public text, by the number of texts they occur in, most frequent first: the blind guess."""
    ids, mask = offsite._encode(off, texts, max_length)
    counts = Counter()
    for row, m in zip(ids.tolist(), mask.tolist()):
        counts.update({t for t, k in zip(row, m) if k and t not in special})
    return [tok for tok, _ in counts.most_common()]


def top_pairs(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> set[tuple[int, int]]:
    flat = scores.flatten()
    best = torch.topk(flat, min(n, flat.numel())).indices
    width = scores.shape[1]
    return {(int(candidates[i % width]), int(i // width)) for i in best.tolist()}


def frequent_pairs(off: offsite.Offsite, texts: list[str], max_length: int, special: set[int]) -> list[tuple[int, int]]:
    """(token, position) pairs of public text, most frequent first: the blind guess."""
    ids, mask = offsite._encode(off, texts, max_length)
    counts = Counter()
    for row, m in zip(ids.tolist(), mask.tolist()):
        counts.update((t, p) for p, (t, k) in enumerate(zip(row, m)) if k and t not in special)
    return [pair for pair, _ in counts.most_common()]


# -- one update -------------------------------------------------------------------------------------


def device_update(off: offsite.Offsite, sent: dict, batches, *, learning_rate: float, seed: int) -> dict:
    """What the device returns: ``sent`` loaded, its own training (offsite.train_emulator, the
    device's code), the adapters read back."""
    off.load_adapters(sent, emulator=True)
    offsite.train_emulator(off, batches, learning_rate=learning_rate, seed=seed)
    return off.adapter_state(emulator=True)


def active_adapters(off: offsite.Offsite, base: dict, seed: int) -> dict:
    """The active cloud's adapters: block 0's A zero, its B tiny and random, the rest as ``base``."""
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for key in first_block_keys(off, "lora_A"):
        out[key] = torch.zeros_like(base[key])
    for key in first_block_keys(off, "lora_B"):
        out[key] = torch.randn(base[key].shape, generator=g) * ACTIVE_B_SCALE
    return out


def embedding_dropout(off: offsite.Offsite) -> float:
    """The dropout on block 0's input while the device trains (public: the model's config)."""
    c = off.emulator.base_model.model.config
    return float(getattr(c, "hidden_dropout_prob", 0.0) if off.family == "encoder" else getattr(c, "embd_pdrop", 0.0) or 0.0)


def attack_update(off: offsite.Offsite, sent: dict, returned: dict, *, n: int, positions: int,
                  candidates: torch.Tensor, shortlist: int = 40) -> tuple[set[tuple[int, int]], int]:
    """The recovered (token, position) pairs and the update's numerical rank: every candidate
    scored by its energy in the span, then the best ``shortlist * n`` re-scored by
    :func:`trimmed_residuals` (the device's dropout set aside), the ``n`` lowest kept. Encoders
    only: a decoder's block input carries no position (rotary positions act after the projection),
    so its candidates are tokens, not (token, position) pairs, and that scoring is not built."""
    if off.family != "encoder":
        raise ValueError(f"the span attack scores (token, position) pairs of an encoder; got a {off.family} "
                         "(rotary positions act after the projection: token-only scoring is not built)")
    rows = torch.cat([returned[k] - sent[k] for k in first_block_keys(off, "lora_A")])
    basis = row_space(rows)
    scores = span_scores(off, basis, positions, candidates)
    drop = embedding_dropout(off)
    if drop == 0.0 or basis.shape[1] == 0:
        return top_pairs(scores, candidates, n), int(basis.shape[1])
    width = scores.shape[1]
    best = torch.topk(scores.flatten(), min(shortlist * n, scores.numel())).indices
    toks, pos = candidates[best % width], best // width
    x = torch.empty(len(best), basis.shape[0])
    for p in pos.unique().tolist():
        at = (pos == p).nonzero().flatten()
        x[at] = block_inputs(off, toks[at], int(p))
    resid = torch.cat([trimmed_residuals(basis, x[at:at + 512], drop) for at in range(0, len(best), 512)])
    order = torch.argsort(resid)[:n]
    return {(int(toks[i]), int(pos[i])) for i in order.tolist()}, int(basis.shape[1])


def attack_tokens(off: offsite.Offsite, sent: dict, returned: dict, *, n: int,
                  candidates: torch.Tensor) -> tuple[set[int], int]:
    """A decoder's update: the ``n`` candidate tokens whose block-0 input has the most energy in
    the span of the returned ``A`` minus the sent one, and the update's numerical rank. A decoder
    that trains with dropout on that input would need :func:`trimmed_residuals`; SmolLM2 has none,
    and this refuses a decoder whose config sets it."""
    if off.family != "decoder":
        raise ValueError(f"attack_tokens scores a decoder's tokens; got family={off.family!r} (use attack_update, "
                         "whose candidates carry the position)")
    drop = embedding_dropout(off)
    if drop:
        raise ValueError(f"the decoder trains with dropout {drop} on block 0's input; the token attack "
                         "does not set it aside")
    rows = torch.cat([returned[k] - sent[k] for k in first_block_keys(off, "lora_A")])
    basis = row_space(rows)
    scores = span_scores(off, basis, 1, candidates)[0]
    best = torch.topk(scores, min(n, len(candidates))).indices
    return {int(candidates[i]) for i in best.tolist()}, int(basis.shape[1])
