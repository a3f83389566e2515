"""Cache the bottom's outputs after block SPLIT for the screens: Rotten Tomatoes train, validation,
test and victim sentences, and the IMDB auxiliary text, with the sweep's seed-0 samples.

    python -m simulations.screening cache SPLIT [LIMIT]

LIMIT (default 0: all) keeps the first LIMIT sentences of each part, for a quick check. The file
goes to ``screen_lib.cache_path(SPLIT)``.
"""
import sys
import time

import torch


def main(argv):
    from privtune_flwr import data
    from privtune_flwr.defenses import build_defense
    from privtune_flwr.device import DeviceSide
    from privtune_flwr.models import load_split
    from simulations import privacy_utility as pu
    from simulations.screening.screen_lib import cache_path

    m = int(argv[0])
    limit = int(argv[1]) if len(argv) > 1 else 0
    torch.set_num_threads(1)
    cut = (lambda xs: list(xs)[:limit]) if limit else list
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
                                ("aux", inputs["aux_texts"], [0] * len(inputs["aux_texts"]))):
        t = time.time()
        texts, labels = cut(texts), cut(labels)
        rows, ids = [], []
        for i in range(0, len(texts), 256):
            rel = dev.release(texts[i:i + 256])
            for h, msk, tid in zip(rel.hidden, rel.attention_mask, rel.input_ids):
                rows.append(h[msk.bool()].clone())
                ids.append(tid[msk.bool()].clone())
        out[name] = {"rows": rows, "ids": ids, "labels": torch.tensor(list(labels))}
        print(name, len(rows), round(time.time() - t, 1), flush=True)
    out["aux_attr"], out["victim_attr"], out["keywords"] = inputs["aux_attr"], inputs["victim_attr"], inputs["keywords"]
    path = cache_path(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    print("written", path)


if __name__ == "__main__":
    main(sys.argv[1:])
