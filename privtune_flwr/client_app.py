"""The device: a Flower ClientApp that releases defended representations of its private text.

Drop-in for deployments: ``flower-supernode --node-config "partition-id=0 num-partitions=2"``
serves ``privtune_flwr.client_app:app``. In simulation Flower sets the same two keys.

The device trusts nothing the cloud sends. Its noise comes from its own secret key (OS entropy;
kept in ``context.state`` when simulated, in a private key file otherwise), never from the run
config, the round or the message; each example is released once (the same tensor on every
re-send). Its privacy floor comes from its own node config (:mod:`privtune_flwr.device_policy`):
a run config asking for less gets an error reply that names the floor.

This module is the device's table of messages; each protocol's handlers live in their own module
over the shared runtime (:mod:`privtune_flwr.device_runtime`):

=====================================  ==========================================================
message type                           handler
=====================================  ==========================================================
``train``, ``evaluate``                :mod:`~privtune_flwr.device_vanilla` (offsite: ``offsite``)
``train.forward``, ``train.head``,     :mod:`~privtune_flwr.device_ushaped`
``evaluate.forward``, ``evaluate.head``
``evaluate.prompt``/``next``/``finish``  :mod:`~privtune_flwr.device_generation`
``query.fit``/``reader``/``map``       :mod:`~privtune_flwr.device_map` (the federation's label map)
``query``                              :func:`query` (which partition this device holds)
=====================================  ==========================================================
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import device_generation, device_map, device_ushaped, device_vanilla
from .data import partition_ids
from .schema import SchemaError, device_identity

app = ClientApp()


def query(msg: Message, context: Context) -> Message:
    """Say which data partition this device holds; the cloud orders devices by it."""
    if len(msg.content.keys()):
        raise SchemaError(f"the identity query carries records {sorted(msg.content.keys())}; it carries none")
    return Message(content=device_identity(*partition_ids(context.node_config)), reply_to=msg)


# message type -> handler: every message the device answers
HANDLERS = {
    "train": device_vanilla.train,
    "evaluate": device_vanilla.evaluate,
    "train.forward": device_ushaped.train_forward,
    "train.head": device_ushaped.train_head,
    "evaluate.forward": device_ushaped.evaluate_forward,
    "evaluate.head": device_ushaped.evaluate_head,
    "evaluate.prompt": device_generation.evaluate_prompt,
    "evaluate.next": device_generation.evaluate_next,
    "evaluate.finish": device_generation.evaluate_finish,
    "query": query,
    "query.fit": device_map.query_fit,
    "query.reader": device_map.query_reader,
    "query.map": device_map.query_map,
}


def _register(client_app: ClientApp) -> None:
    for message_type, handler in HANDLERS.items():
        category, _, action = message_type.partition(".")
        register = getattr(client_app, category)
        (register(action) if action else register())(handler)


_register(app)
