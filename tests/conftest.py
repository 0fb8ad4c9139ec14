"""Shared fixtures: tiny models built locally (no downloads), cached per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

# A smaller shape than the default recipe keeps the many exactness tests quick on 2 cores.
TEST_RECIPE = TinyModelRecipe(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=0)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_path(model_cache: Path) -> Path:
    """A random-init tiny Llama; loaded through ``from_pretrained`` like any user model."""
    return ensure_tiny_model(TEST_RECIPE, model_cache)


@pytest.fixture
def runner(tiny_model_path: Path) -> ModelRunner:
    torch.manual_seed(0)
    return ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=RunnerConfig())


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One real Kafka-wire broker (Tansu) for the session; tests use unique topic prefixes."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix unique to the test: Tansu breaks if a topic is deleted and recreated in one life."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def rl_base_path() -> Path:
    """The pretrained base RL starts from: the same recipe as ``hotlora model init --pretrain`` and the
    demo, in the user's cache (built once, ~2 minutes on 2 cores, then reused across sessions)."""
    from hotlora.models.model_init import rl_base_model

    return Path(rl_base_model(progress=False))
