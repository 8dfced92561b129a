"""Light client for Pictor: ``pip install .`` from the checkout brings only grpcio,
grpcio-health-checking and protobuf."""

from pictor.client.aio import PictorAsyncClient
from pictor.client.client import (
    Classification,
    Hit,
    Label,
    OpenSetCheck,
    PictorClient,
    ServerInfo,
    StoredItem,
    UpsertItem,
)
from pictor.config import ClientTLS

__all__ = ["Classification", "ClientTLS", "Hit", "Label", "OpenSetCheck", "PictorAsyncClient", "PictorClient",
           "ServerInfo", "StoredItem", "UpsertItem"]
