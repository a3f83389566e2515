"""The names that both the run config and the modules below it accept, stated once.

Torch-free and importing nothing of the project, so that the lowest modules (the models, the data,
the mechanism) and the run config all read the same tuple.
"""

TASKS = ("classification", "generation")
# How the model is split between a device and the cloud (``models.load_split``); the run config adds
# ``"offsite"``, which runs no split model.
SPLIT_PROTOCOLS = ("vanilla", "u-shaped")
PARTITIONERS = ("iid", "dirichlet")
# Who fits label-subspace's map: each device on its own share, or the federation's fit phase
# (``privtune_flwr.federated_map``); the run config's fit scope and the privacy statement's.
MAP_SCOPES = ("device", "federation")
# Who takes the federation map's reader steps (``privtune_flwr.federated_reader``): each asked device
# takes its own Adam steps and sends the change, or sends one noisy gradient sum a round and the cloud
# steps on their sum.
FIT_OPTIMIZERS = ("device", "cloud")
