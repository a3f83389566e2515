"""Converged utility of headline points under another top recipe, with only the KNN attack
(adaptive) so that each point keeps a row: the releases, and so every attack score, do not depend
on what the cloud's top trains, so the six-attack scores of the stored points at the same seed,
split and defence still apply (the KNN score checks that they match).

    python -m simulations.screening.top_utility SEED DEFENCES OUT [LORA_TARGETS] [DECAYS]
"""
import sys

import torch

from simulations import privacy_utility as pu

seed, defenses, out = int(sys.argv[1]), tuple(sys.argv[2].split(",")), sys.argv[3]
targets = sys.argv[4] if len(sys.argv) > 4 else "all"
decays = int(sys.argv[5]) if len(sys.argv) > 5 else 2
torch.set_num_threads(1)
pu.log_validation_scores()
settings = pu.full_settings(**{**pu.HEADLINE_COMMON, "defenses": defenses, "epsilons": (pu.HEADLINE_EPSILON,),
                               "seeds": (seed,), "attacks": ("eia-knn",), "attack_options": {},
                               "protocols": ("adaptive",), "split_layer": 3, "subspace_rank": 2,
                               "decays": decays, "lora_targets": targets})
pu.sweep(settings, out, plots=False)
