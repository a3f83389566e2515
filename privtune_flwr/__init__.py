"""privtune-flwr: PrivTune split fine-tuning of language models over Flower.

Where things live (top to bottom): ``client_app`` (the device's Flower app: its table of
messages) over one module per protocol (``device_vanilla``, ``device_ushaped``,
``device_generation``, ``device_map``) and their shared ``device_runtime``; the cloud's ServerApp
and strategies are the top-level ``strategies`` package, which imports this one and never the
other way round; ``schema`` (message records); ``defenses``, ``registry`` and ``attacks``;
``mechanism`` (the PrivTune noise); ``models``, ``data``, ``resources`` and ``vocab``.
"""

__version__ = "0.1.0"
