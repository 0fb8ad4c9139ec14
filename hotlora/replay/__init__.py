"""Topic replay: record topics to an ``.hlr`` file, replay its requests to a fresh engine, diff results, tail.

One module per job: ``format`` (the file), ``messages`` (what a file holds, decoded), ``kafka``
(group-less reading), ``record``, ``replay``, ``diff``, ``tail``; ``cli`` wires them to ``hotlora``.
The file format and the determinism results are in ``docs/replay.md``.
"""
