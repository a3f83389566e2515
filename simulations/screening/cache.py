"""Cache bottom outputs (layer m) for RT train/val/test and IMDB aux (seed 0 sweep samples)."""
import sys, torch, time
torch.set_num_threads(1)
from privtune_flwr import data
from privtune_flwr.models import load_split
from privtune_flwr.defenses import build_defense
from privtune_flwr.device import DeviceSide
from simulations import privacy_utility as pu
m = int(sys.argv[1])
s = pu.full_settings(**pu.HEADLINE_COMMON)
ds = data.load_dataset("rotten_tomatoes", seed=0)
train, val = data.holdout(ds.train, 0.1, seed=0)
victim = pu._sample(ds.test, 500, 0)
inputs = pu.attack_inputs("rotten_tomatoes", ds, victim, s, 0)
split = load_split("minilm", m, "classification", 2, seed=0)
dev = DeviceSide(split, build_defense("none", split=split), max_length=64, audit_tokens=0)
out = {}
for name, texts, labels in (("train", train["text"], train["label"]), ("val", val["text"], val["label"]),
                            ("test", ds.test["text"], ds.test["label"]), ("victim", victim["text"], victim["label"]),
                            ("aux", inputs["aux_texts"], [0]*len(inputs["aux_texts"]))):
    t = time.time()
    rows, ids = [], []
    for i in range(0, len(texts), 256):
        rel = dev.release(texts[i:i+256])
        for h, msk, tid in zip(rel.hidden, rel.attention_mask, rel.input_ids):
            rows.append(h[msk.bool()].clone()); ids.append(tid[msk.bool()].clone())
    out[name] = {"rows": rows, "ids": ids, "labels": torch.tensor(list(labels))}
    print(name, len(rows), time.time()-t, flush=True)
out["aux_attr"] = inputs["aux_attr"]; out["victim_attr"] = inputs["victim_attr"]; out["keywords"] = inputs["keywords"]
torch.save(out, f"outputs/screening/cache_m{m}.pt")
