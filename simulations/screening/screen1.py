import sys, json, time, torch
torch.set_num_threads(1)
from simulations.screening.screen_lib import *
M = int(sys.argv[4]) if len(sys.argv) > 4 else 1
split, tr, va, vi, ax, sm = load_cache(M)
res = []
for k in [int(x) for x in sys.argv[1].split(",")]:
    for adv in [float(x) for x in sys.argv[2].split(",")]:
        t = time.time()
        c, Q, reader, sd = fit_subspace(tr["rows"], tr["ids"], tr["labels"], k, adv=adv)
        acc = reader_accuracy(reader, c, Q, sd, va["rows"], va["ids"], va["labels"])
        for eps in [None] + [float(x) for x in sys.argv[3].split(",") if x]:
            vrows = project_rows(vi["rows"], vi["ids"], c, Q, eps, sm, seed=1)
            arows = project_rows(ax["rows"], ax["ids"], c, Q, eps, sm, seed=2)
            e2 = eia2(arows, ax["ids"], vrows, vi["ids"], split)
            r = {"m": M, "k": k, "adv": adv, "eps": eps, "reader_val_acc": acc, "eia2": e2["asr"], "blind": e2["blind_accuracy"], "sec": time.time() - t}
            print(json.dumps(r), flush=True)
