"""Pictor: image retrieval and classification over gRPC.

The base install is the light client (``pictor.client``); the server, indexer and trainer
need the ``server`` extra (``pip install '.[server]'`` from the checkout).
"""

__version__ = "0.2.0"
