"""privtune-flwr: PrivTune split fine-tuning of language models over Flower.

Where things live (top to bottom): ``client_app``/``server_app`` and the top-level
``strategies`` package (Flower); ``schema`` (message records); ``defenses`` and ``attacks``;
``mechanism`` (the PrivTune noise); ``models`` and ``data``.
"""

__version__ = "0.1.0"
