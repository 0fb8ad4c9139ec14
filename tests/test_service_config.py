"""``ServiceConfig``'s residency knob: a flag and a ``HOTLORA_*`` variable like every other."""

from __future__ import annotations

import argparse

import pytest

from hotlora.engine.adapters import DEFAULT_RESIDENT_MEMORY_FRACTION
from hotlora.engine.kafka.service_config import ServiceConfig, add_arguments, from_sources


def test_resident_memory_fraction_from_flag_and_environment() -> None:
    assert ServiceConfig().resident_memory_fraction == DEFAULT_RESIDENT_MEMORY_FRACTION
    assert from_sources(None, {"HOTLORA_RESIDENT_MEMORY_FRACTION": "0.4"}).resident_memory_fraction == 0.4
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--resident-memory-fraction", "0.1"])
    assert from_sources(args, {"HOTLORA_RESIDENT_MEMORY_FRACTION": "0.4"}).resident_memory_fraction == 0.1
    with pytest.raises(ValueError, match="HOTLORA_RESIDENT_MEMORY_FRACTION"):
        from_sources(None, {"HOTLORA_RESIDENT_MEMORY_FRACTION": "a quarter"})
