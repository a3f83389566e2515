"""A non-linear trainable obfuscator on the device: rank, adversarial weight, split (exploration).

    python -m simulations.screening.screen3 2,4 0,1 1 [entropy [eia3]]

Per setting: the validation accuracy of the reader trained with the obfuscator (the label kept),
and the adaptive EIA-2 top-1 recovery of a fresh inverter trained on auxiliary text released the
same way (token identity kept). Compare with ``screen1`` (the linear projection). ``entropy``: the
obfuscator maximises the inverter's prediction entropy rather than its cross-entropy; ``eia3``:
the contextual inverter (EIA-3, token-set F1) is run as well."""
import sys, json, time, torch
torch.set_num_threads(1)
from simulations.screening.screen_lib import *
M = int(sys.argv[3]) if len(sys.argv) > 3 else 1
MODE = sys.argv[4] if len(sys.argv) > 4 else "ce"
CONTEXT = len(sys.argv) > 5 and sys.argv[5] == "eia3"
split, tr, va, vi, ax, sm = load_cache(M)
for k in [int(x) for x in sys.argv[1].split(",")]:
    lift, _ = torch.linalg.qr(torch.randn(split.hidden_size, k, generator=torch.Generator().manual_seed(0)))
    for adv in [float(x) for x in sys.argv[2].split(",")]:
        t = time.time()
        c, sd, obf, reader = fit_obfuscator(tr["rows"], tr["ids"], tr["labels"], k, adv=adv, adv_mode=MODE)
        acc = obfuscator_accuracy(reader, c, sd, obf, va["rows"], va["ids"], va["labels"])
        fit_s = time.time() - t
        arows = obfuscated_rows(ax["rows"], ax["ids"], c, sd, obf, lift, sm)
        vrows = obfuscated_rows(vi["rows"], vi["ids"], c, sd, obf, lift, sm)
        e2 = eia2(arows, ax["ids"], vrows, vi["ids"], split)
        r = {"m": M, "k": k, "adv": adv, "mode": MODE, "reader_val_acc": acc, "eia2": e2["asr"],
             "blind": e2["blind_accuracy"], "fit_s": fit_s}
        if CONTEXT:
            e3 = eia3(arows, ax["ids"], vrows, vi["ids"], split)
            r.update(eia3=e3["asr"], eia3_blind=e3.get("blind_f1"))
        print(json.dumps({**r, "sec": time.time() - t}), flush=True)
