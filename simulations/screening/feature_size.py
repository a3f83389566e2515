"""How large the obfuscator's features come out of the fit, beside the projection's coordinates.

    python -m simulations.screening.feature_size [SPLIT] [SENTENCES]

On the first ``SENTENCES`` (default 1500) cached Rotten Tomatoes training sentences at split
``SPLIT`` (default 3; ``python -m simulations.screening.cache SPLIT`` first): the RMS spread per
direction of the rank-2 label subspace's coordinates, and of ``label-obfuscator``'s features as
fitted (before the size factor), without and with the entropy adversary; and the hidden's mean
spread per dimension, which the factor gives the features."""
import sys, json, time, torch
torch.set_num_threads(1)
from simulations.screening.screen_lib import SPECIAL
from privtune_flwr.mechanism.obfuscator import fit_obfuscator
from privtune_flwr.mechanism.subspace import fit_subspace
M = int(sys.argv[1]) if len(sys.argv) > 1 else 3
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
tr = torch.load(f"outputs/screening/cache_m{M}.pt")["train"]
rows, ids, labels = tr["rows"][:N], tr["ids"][:N], tr["labels"][:N].tolist()
special = torch.tensor(SPECIAL)
flat, tokens = torch.cat(rows), torch.cat(ids)
regular = flat[~torch.isin(tokens, special)]
t = time.time()
sub = fit_subspace(rows, ids, labels, rank=2, special_ids=special)
coords = (regular - sub.center) @ sub.basis
out = {"split": M, "sentences": len(rows), "hidden_mean_spread": float(regular.std(0).mean()),
       "subspace_rms": float(coords.var(0).mean().sqrt()), "subspace_fit_s": time.time() - t}
for weight in (0.0, 1.0):
    t = time.time()
    obf = fit_obfuscator(rows, ids, labels, rank=2, special_ids=special, adversary_weight=weight)
    out[f"obfuscator_rms_adv{weight:g}"] = obf.fitted_spread
    out[f"obfuscator_fit_s_adv{weight:g}"] = time.time() - t
print(json.dumps(out), flush=True)
