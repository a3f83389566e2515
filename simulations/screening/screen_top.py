import sys, json, time, torch
torch.set_num_threads(1)
from simulations.screening.screen_lib import *
from privtune_flwr.models import load_split
m = int(sys.argv[4]) if len(sys.argv) > 4 else 1
C = torch.load(f"outputs/screening/cache_m{m}.pt")
split = load_split("minilm", m, "classification", 2, seed=0)
tr, va = C["train"], C["val"]
sm = special_means_of(tr["rows"], tr["ids"])
steps = int(sys.argv[3])
for k in [int(x) for x in sys.argv[1].split(",")]:
    for eps in [None if x == "none" else float(x) for x in sys.argv[2].split(",")]:
        t = time.time()
        if k == 0:
            trows, vrows = tr["rows"], va["rows"]; acc = None
        else:
            c, Q, reader, sd = fit_subspace(tr["rows"], tr["ids"], tr["labels"], k)
            acc = reader_accuracy(reader, c, Q, sd, va["rows"], va["ids"], va["labels"])
            trows = project_rows(tr["rows"], tr["ids"], c, Q, eps, sm, seed=3)
            vrows = project_rows(va["rows"], va["ids"], c, Q, eps, sm, seed=4)
        hist = top_utility(split, trows, tr["labels"], vrows, va["labels"], steps=steps, eval_every=200)
        print(json.dumps({"m": m, "k": k, "eps": eps, "reader": acc, "top_val": hist, "sec": time.time() - t}), flush=True)
