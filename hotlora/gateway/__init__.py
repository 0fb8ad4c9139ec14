"""The Tinker API in front of hotlora: ``hotlora gateway`` (``docs/tinker.md``).

- ``server``: the aiohttp application, one handler per endpoint, over one ``HotLoraClient`` per API key;
- ``tinker_api``: ids, paths, request bodies, loss settings and results in Tinker's vocabulary (no I/O);
- ``proto``: the SDK's protobuf messages, read and written by hand;
- ``futures``: futures in flight and the order in which a model's requests start;
- ``samplers``: frozen copies, so a sampling client keeps the weights it was made from;
- ``checkpoints``: checkpoint listing from the engine's ``checkpoints`` topic;
- ``tenants``: API keys to principals and tokens;
- ``launch``: the ``hotlora gateway`` process (with its own broker and engine, or in front of a fleet).
"""
