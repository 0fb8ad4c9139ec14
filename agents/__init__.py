"""hotlora's agent side: the ``HotLoraClient`` SDK that agents and services embed."""

from hotlora.agents.client import ClientClosed, ClientStats, HotLoraClient, RequestTimeout

__all__ = ["ClientClosed", "ClientStats", "HotLoraClient", "RequestTimeout"]
