"""Converged utility of headline points under another top recipe, with only the KNN attack
(adaptive) so that each point keeps a row: the releases, and so every attack score, do not depend
on what the cloud's top trains, so the six-attack scores of the stored points at the same seed,
split and defence still apply (the KNN score checks that they match).

    python -m simulations.screening top-utility SEED DEFENCES OUT [LORA_TARGETS] [DECAYS]
"""
import sys

import torch


def settings(seed: int, defenses: tuple, targets: str = "all", decays: int = 2):
    """The sweep's headline settings at split 3, rank 2, with this top recipe and the KNN attack alone."""
    from simulations import privacy_utility as pu

    return pu.full_settings(**{**pu.HEADLINE_COMMON, "defenses": defenses, "epsilons": (pu.HEADLINE_EPSILON,),
                               "seeds": (seed,), "attacks": ("eia-knn",), "attack_options": {},
                               "protocols": ("adaptive",), "split_layer": 3, "subspace_rank": 2,
                               "decays": decays, "lora_targets": targets})


def main(argv) -> None:
    from simulations import privacy_utility as pu

    seed, defenses, out = int(argv[0]), tuple(argv[1].split(",")), argv[2]
    targets = argv[3] if len(argv) > 3 else "all"
    decays = int(argv[4]) if len(argv) > 4 else 2
    torch.set_num_threads(1)
    pu.log_validation_scores()
    pu.sweep(settings(seed, defenses, targets, decays), out, plots=False)


if __name__ == "__main__":
    main(sys.argv[1:])
