import sys, json, time, torch
torch.set_num_threads(1)
from simulations.screening.screen_lib import *
M = int(sys.argv[1]); k = int(sys.argv[2]); shares = [float(x) for x in sys.argv[3].split(",")]; steps = int(sys.argv[4])
split, tr, va, vi, ax, sm = load_cache(M)
c, Q, reader, sd = fit_subspace(tr["rows"], tr["ids"], tr["labels"], k)
acc = reader_accuracy(reader, c, Q, sd, va["rows"], va["ids"], va["labels"])
for share in shares:
    t = time.time()
    if share > 0:
        kept, real_share = keep_vocab(tr["ids"], tr["labels"], share)
    else:
        kept, real_share = torch.zeros(30522, dtype=torch.bool), 0.0
    P = lambda rows, ids, s: project_rows_keep(rows, ids, c, Q, kept, None, sm, seed=s)
    e2 = eia2(P(ax["rows"], ax["ids"], 2), ax["ids"], P(vi["rows"], vi["ids"], 1), vi["ids"], split)
    r = {"m": M, "k": k, "share": share, "kept_share_train": real_share, "reader": acc, "eia2": e2["asr"]}
    print(json.dumps(r), flush=True)
    if steps:
        hist = top_utility(split, P(tr["rows"], tr["ids"], 3), tr["labels"], P(va["rows"], va["ids"], 4), va["labels"], steps=steps, eval_every=200)
        r["top_val"] = hist; r["sec"] = time.time() - t
        print(json.dumps(r), flush=True)
