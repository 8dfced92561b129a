"""Light client for Pictor: ``pip install pictor`` brings only grpcio and protobuf."""

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

__all__ = ["Classification", "Hit", "Label", "OpenSetCheck", "PictorClient", "ServerInfo", "StoredItem", "UpsertItem"]
