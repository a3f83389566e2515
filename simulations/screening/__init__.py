"""Screening runs for the label-subspace defence (exploration, not the sweep).

Each script reads bottom outputs cached once by ``cache`` and prints one JSON line per setting;
the README's screening table ("Against an attacker who adapts") came from these commands, on
Rotten Tomatoes with the sweep's seed-0 samples (IMDB auxiliary text for EIA-2):

    python -m simulations.screening.cache 1                       # and 3: split after block 1 / 3
    python -m simulations.screening.screen1 1,4,16 0 "" 1         # rank, adversarial weight, eps, split
    python -m simulations.screening.screen1 1,2 0 "" 3
    python -m simulations.screening.screen1 4,16 1,3 "" 1         # fitted against a token inverter (weights 1, 3)
    python -m simulations.screening.screen3 4,2 0,1 1             # a non-linear per-token obfuscator: rank, weight, split
    python -m simulations.screening.feature_size 3 1500           # the obfuscator's fitted feature size vs the projection's
    python -m simulations.screening.screen_top 1 none 1000 1      # the LoRA top on rank-1 releases
    python -m simulations.screening.screen2 1 1 0.03,0.06 400     # rank 1 plus the most label-informative tokens kept
    python -m simulations.screening.conv_none 1e-3 16 4 0         # `none` to convergence (lr, batch, patience, decays)
    python -m simulations.screening.screen4 3 1,2,4,8 label,inverter,pca,random  # who chooses the basis: split, ranks, bases

The subspace here is fitted by ``screen_lib.fit_subspace`` (a small attention reader), the
prototype of ``privtune_flwr.mechanism.subspace``; no noise is added to the projection
(``eps`` empty). Numbers are validation accuracies and adaptive EIA-2 top-1 recovery, one seed.
"""
