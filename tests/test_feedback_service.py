"""The embedding example over HTTP: aiohttp's test client -> the app -> HotLoraClient -> Kafka -> the engine.

Run twice: against the real ``EngineService`` (what a deployment runs) and against the in-test
responder over an in-process ``Engine`` (which also shows what went over the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from examples.feedback_service import SERVICE, FeedbackConfig, create_app, load_tokenizer
from hotlora.engine.core import Engine
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.service import EngineService
from hotlora.schemas import ForwardBackward, OptimStep, Topics
from tests.helpers import running_engine_service, service_config_for_tests
from tests.kafka_responder import EngineHandler, Responder


def test_config_reads_flags_over_environment() -> None:
    env = {"HOTLORA_BOOTSTRAP": "h:1", "HOTLORA_MODEL": "/m", "FEEDBACK_K": "3", "FEEDBACK_LEARNING_RATE": "0.5"}
    config = FeedbackConfig.from_args(["--k", "4", "--adapter-id", "tenant-7"], env)
    assert (config.bootstrap, config.model, config.k, config.learning_rate) == ("h:1", "/m", 4, 0.5)
    assert config.adapter_id == "tenant-7" and config.port == 8080
    with pytest.raises(SystemExit):
        FeedbackConfig.from_args([], {})


def engine_service(
    bootstrap: str, prefix: str, model: Path, tmp_path: Path
) -> contextlib.AbstractAsyncContextManager[EngineService]:
    return running_engine_service(service_config_for_tests(bootstrap, prefix, model, tmp_path / "checkpoints"))


@contextlib.asynccontextmanager
async def in_test_responder(bootstrap: str, prefix: str, model: Path) -> AsyncIterator[Responder]:
    engine = Engine.from_pretrained(model, dtype="float32", device="cpu")
    async with engine, Responder(bootstrap, Topics(prefix), EngineHandler(engine)) as responder:
        yield responder


@pytest.mark.parametrize("backend", ["engine_service", "in_test_responder"])
def test_feedback_trains_the_adapter_every_k(
    backend: str, broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    config = FeedbackConfig(
        bootstrap=broker.bootstrap,
        model=str(tiny_model_path),
        topic_prefix=topic_prefix,
        adapter_id="tenant-a",
        k=2,
        learning_rate=1e-2,
        rank=4,
        max_tokens=6,
        temperature=0.0,
        request_timeout=20.0,
    )

    async def main() -> None:
        if backend == "engine_service":
            engine = engine_service(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path)
        else:
            engine = in_test_responder(broker.bootstrap, topic_prefix, tiny_model_path)
        async with engine as responder:
            app = create_app(config, tokenizer=load_tokenizer(config.model))
            async with TestClient(TestServer(app)) as http:
                first = await http.post("/generate", json={"prompt": "2+2="})
                assert first.status == 200, await first.text()
                body = await first.json()
                assert isinstance(body["text"], str) and body["version"] == 0

                feedback = {"prompt": "2+2=", "completion": body["text"], "correction": "4"}
                one = await (await http.post("/feedback", json=feedback)).json()
                assert one["accepted"] and not one["trained"] and one["buffered"] == 1
                low = {"prompt": "2+2=", "completion": "5", "rating": -1}
                skipped = await (await http.post("/feedback", json=low)).json()
                assert not skipped["accepted"] and skipped["buffered"] == 1
                liked = {"prompt": "3+3=", "completion": "6", "rating": 1}
                two = await (await http.post("/feedback", json=liked)).json()
                assert two["trained"] and two["version"] == 1 and two["buffered"] == 0
                first_loss = two["last_loss"]

                # Same data again: the adapter learned from it, so its loss falls.
                await http.post("/feedback", json=feedback)
                three = await (await http.post("/feedback", json=liked)).json()
                assert three["version"] == 2 and three["last_loss"] < first_loss

                after = await (await http.post("/generate", json={"prompt": "2+2="})).json()
                assert after["version"] == 2
                stats = await (await http.get("/stats")).json()
                assert stats["feedbacks"] == 5 and stats["trained_steps"] == 2

                bad = await http.post("/feedback", json={"prompt": "x", "completion": "y"})
                assert bad.status == 400
                assert (await http.post("/generate", data=b"not json")).status == 400
                assert app[SERVICE].client.stats.in_flight == 0

            if isinstance(responder, Responder):
                # The training datums went over the wire as forward_backward + optim_step pairs.
                train = [type(m).__name__ for _, _, m in responder.seen if isinstance(m, ForwardBackward | OptimStep)]
                assert train == ["ForwardBackward", "OptimStep"] * 2

    asyncio.run(asyncio.wait_for(main(), 90))
