"""hotlora's engine: the vocabulary (``types``), the verbs (``verbs``), the core (``core.Engine`` and
what it drives), and the Kafka edge (``kafka``); ``docs/architecture.md`` has the layers."""
