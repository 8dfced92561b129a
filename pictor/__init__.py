"""Pictor: image retrieval and classification over gRPC.

The base install is the light client (``pictor.client``); the server, indexer and trainer
need the ``server`` extra (``pip install 'pictor[server]'``).
"""

__version__ = "0.1.0"
