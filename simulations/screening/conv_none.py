import sys, time, json, torch
torch.set_num_threads(1)
from privtune_flwr import data
from privtune_flwr.models import load_split
from privtune_flwr.defenses import build_defense
from privtune_flwr.device import DeviceSide
from privtune_flwr.cloud import CloudSide
from simulations.training import ReleasedSet, StopRule, evaluate_set, fine_tune_to_convergence
lr = float(sys.argv[1]); bs = int(sys.argv[2])
ds = data.load_dataset("rotten_tomatoes", seed=0)
train, val = data.holdout(ds.train, 0.1, seed=0)
split = load_split("minilm", 1, "classification", 2, seed=0)
if len(sys.argv) > 5 and sys.argv[5] == "pooler":
    for n, p in split.top.named_parameters():
        if "pooler" in n:
            p.requires_grad_(True)
    print("trainable", sum(p.numel() for p in split.top.parameters() if p.requires_grad), flush=True)
dev = DeviceSide(split, build_defense("none", split=split), max_length=64, audit_tokens=0)
cloud = CloudSide(split, learning_rate=lr, batch_size=bs, seed=0)
t = time.time()
out = fine_tune_to_convergence(dev, cloud, train, val, StopRule(patience=int(sys.argv[3]), eval_every=100, max_steps=3000, decays=int(sys.argv[4])), progress=False)
test = evaluate_set(cloud, ReleasedSet(dev, ds.test["text"], ds.test["label"]))
out["test"] = test; out["seconds"] = time.time() - t
print(json.dumps(out))
