"""hotlora's Kafka edge: the engine service and what it needs to serve many tenants over Kafka.

Importing this package imports nothing else: an agent reads ``convert``, ``security`` and ``admin``
from here without loading the engine service or the model code.
"""
