"""The run-config keys, grouped by concern the way Flower apps group theirs (``model.name``,
``train.learning-rate``, ...).

Each :class:`~privtune_flwr.config.RunConfig` field has one key, ``<group>.<leaf>``. In
``pyproject.toml`` they are TOML dotted keys, which Flower flattens back to these strings in
``context.run_config``; ``--run-config "model.split-layer=2"`` overrides one. The flat keys of
earlier versions (``split-layer``) are refused with a message that names the new key.
"""

from __future__ import annotations

# group -> {field name: leaf}; the key is "<group>.<leaf>"
GROUPS: dict[str, dict[str, str]] = {
    "model": {"model": "name", "split_layer": "split-layer", "num_labels": "num-labels", "max_length": "max-length",
              "bottom_device": "bottom-device", "bottom_dtype": "bottom-dtype", "cloud_device": "cloud-device",
              "cloud_dtype": "cloud-dtype", "lora_rank": "lora-rank", "lora_targets": "lora-targets"},
    "data": {"dataset": "name", "task": "task", "test_fraction": "test-fraction", "max_examples": "max-examples",
             "partitioner": "partitioner", "dirichlet_alpha": "dirichlet-alpha"},
    "federation": {"protocol": "protocol", "num_rounds": "num-rounds", "devices_per_round": "devices-per-round",
                   "min_devices": "min-devices", "min_replies": "min-replies", "round_retries": "round-retries",
                   "eval_examples": "eval-examples", "eval_devices": "eval-devices", "final_eval_all": "final-eval-all",
                   "reply_max_examples": "reply-max-examples", "transport_dtype": "transport-dtype",
                   "timeout": "timeout", "setup_timeout": "setup-timeout"},
    "train": {"batches_per_round": "batches-per-round", "batch_size": "batch-size", "learning_rate": "learning-rate",
              "max_grad_norm": "max-grad-norm", "middle_steps": "middle-steps"},
    "offsite": {"offsite_method": "method", "emulator_drop": "emulator-drop", "offsite_adapter_layers": "adapter-layers",
                "distill_steps": "distill-steps", "svd_rank_fraction": "svd-rank-fraction", "local_steps": "local-steps"},
    "generation": {"generate_samples": "samples", "max_new_tokens": "max-new-tokens"},
    "defense": {"defense": "name", "epsilon": "epsilon", "audit_tokens": "audit-tokens", "release": "release",
                "reproducible_noise": "reproducible-noise"},
    # the options of the registry's option classes (privtune_flwr.registry), one group per class
    "defense.graph": {"n_hops": "n-hops", "k": "k", "max_neighbours": "max-neighbours"},
    "defense.privtune": {"radius_scale": "radius-scale", "pgd_steps": "pgd-steps", "lam": "lam", "mu": "mu",
                         "s_min": "s-min", "alpha": "alpha", "importance_levels": "importance-levels"},
    "defense.gaussian": {"delta": "delta", "clip": "clip"},
    # label-subspace (and label-obfuscator's rank)
    "defense.label-subspace": {"subspace_rank": "rank", "subspace_fit": "fit", "subspace_fit_scope": "fit-scope",
                               "subspace_fit_clip": "fit-clip", "subspace_fit_rounds": "fit-rounds",
                               "subspace_fit_steps": "fit-steps", "subspace_fit_lr": "fit-lr",
                               "subspace_fit_grad_clip": "fit-grad-clip", "subspace_fit_devices": "fit-devices",
                               "subspace_fit_optimizer": "fit-optimizer"},
    "label-protection": {"label_protection": "method", "label_epsilon": "epsilon", "label_noise": "noise"},
    "run": {"seed": "seed", "output_dir": "output-dir", "resume_from": "resume-from"},
}

KEYS: dict[str, str] = {name: f"{group}.{leaf}" for group, leaves in GROUPS.items() for name, leaf in leaves.items()}
FIELDS: dict[str, str] = {key: name for name, key in KEYS.items()}
# the flat key each field had before the keys were grouped -> its key now
RENAMED: dict[str, str] = {name.replace("_", "-"): key for name, key in KEYS.items()}


def key(name: str) -> str:
    """The run-config key of the RunConfig field ``name`` (``"split_layer"`` -> ``"model.split-layer"``)."""
    return KEYS[name]


def renamed_message(old: str) -> str:
    """The error for a flat key of an earlier version: it names the key that replaced it."""
    return (f"{old!r} is no longer a run-config key: it is {RENAMED[old]!r} now (the keys are grouped: "
            f"{', '.join(g + '.' for g in GROUPS if '.' not in g)})")
