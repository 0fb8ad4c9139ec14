"""A web service that learns from its users: continual learning with hotlora, embedded in aiohttp.

    python examples/feedback_service.py --bootstrap 127.0.0.1:9092 --model PATH/TO/MODEL --k 8

- ``POST /generate`` ``{"prompt": "..."}`` samples from this tenant's adapter at its latest version and
  returns ``{"text", "version", "stop_reason"}``.
- ``POST /feedback`` ``{"prompt", "completion", "rating"}`` or ``{"prompt", "completion", "correction"}``
  turns the interaction into a training datum: the correction if there is one, else the completion if
  its rating is at least ``min_rating``. A low rating without a correction gives cross-entropy nothing
  to imitate, so it is counted and not trained on. Every ``k`` datums the service runs
  ``forward_backward`` + ``optim_step``, and the next ``/generate`` samples the new version.
- ``GET /stats`` shows the adapter version, the buffered datums and the last loss (nats per trained token).

The base model's tokenizer is loaded from the model directory the engine serves, so token ids match.
Every setting is a flag or an environment variable (``HOTLORA_BOOTSTRAP``, ``HOTLORA_MODEL``,
``HOTLORA_TOPIC_PREFIX``, ``FEEDBACK_ADAPTER_ID``, ``FEEDBACK_K``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from aiohttp import web

from hotlora.agents import HotLoraClient
from hotlora.engine.types import AdamParams, Datum, LoraSpec, SamplingParams
from hotlora.schemas.errors import AdapterExists, HotLoraError, InvalidRequest

# FeedbackConfig field -> (flag help, environment variable)
_FLAGS: dict[str, tuple[str, str]] = {
    "bootstrap": ("Kafka bootstrap HOST:PORT", "HOTLORA_BOOTSTRAP"),
    "model": ("base model directory (for its tokenizer)", "HOTLORA_MODEL"),
    "topic_prefix": ("topic name prefix", "HOTLORA_TOPIC_PREFIX"),
    "adapter_id": ("this tenant's adapter id", "FEEDBACK_ADAPTER_ID"),
    "k": ("feedbacks per training step", "FEEDBACK_K"),
    "learning_rate": ("AdamW learning rate", "FEEDBACK_LEARNING_RATE"),
    "rank": ("LoRA rank of the adapter, if this service creates it", "FEEDBACK_RANK"),
    "min_rating": ("lowest rating whose completion is trained on", "FEEDBACK_MIN_RATING"),
    "max_tokens": ("tokens per generation", "FEEDBACK_MAX_TOKENS"),
    "temperature": ("sampling temperature (0 = greedy)", "FEEDBACK_TEMPERATURE"),
    "request_timeout": ("seconds per engine request attempt", "FEEDBACK_REQUEST_TIMEOUT"),
    "host": ("HTTP listen address", "FEEDBACK_HOST"),
    "port": ("HTTP port", "FEEDBACK_PORT"),
}


@dataclass
class FeedbackConfig:
    bootstrap: str = ""
    model: str = ""  # the base model directory: its tokenizer turns text into the engine's token ids
    topic_prefix: str = "hotlora"
    adapter_id: str = "feedback"
    k: int = 8  # feedbacks per training step
    learning_rate: float = 1e-4
    rank: int = 8
    min_rating: float = 1.0  # a completion rated at least this is trained on as it is
    max_tokens: int = 64
    temperature: float = 0.7
    request_timeout: float = 60.0
    host: str = "127.0.0.1"
    port: int = 8080

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> FeedbackConfig:
        """Flags win over environment variables, which win over the defaults."""
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(description="hotlora feedback service (continual learning over HTTP)")
        for f in fields(cls):
            help_text, var = _FLAGS[f.name]
            cast = type(f.default)  # every default is a str, int or float, which also parses the flag
            default = cast(env[var]) if var in env else f.default
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", type=cast, default=default, help=f"{help_text} (${var})"
            )
        config = cls(**vars(parser.parse_args(argv)))
        if not config.bootstrap or not config.model:
            parser.error("--bootstrap (or $HOTLORA_BOOTSTRAP) and --model (or $HOTLORA_MODEL) are required")
        return config


class FeedbackService:
    """The service's state: one adapter, a buffer of datums, and the version users are served."""

    def __init__(self, config: FeedbackConfig, client: HotLoraClient, tokenizer: Any) -> None:
        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self.buffer: list[Datum] = []
        self.version = 0
        self.feedbacks = 0
        self.trained_steps = 0
        self.last_loss: float | None = None
        self._train_lock = asyncio.Lock()

    async def ensure_adapter(self) -> None:
        """Create the tenant's adapter, or pick up the existing one (a restarted service keeps learning)."""
        try:
            info = await self.client.create_adapter(self.config.adapter_id, LoraSpec(rank=self.config.rank))
        except AdapterExists:
            adapters = await self.client.list_adapters()
            info = next(a for a in adapters if a.adapter_id == self.config.adapter_id)
        self.version = info.version

    def datum(self, prompt: str, completion: str) -> Datum:
        prompt_ids = list(self.tokenizer.encode(prompt))
        completion_ids = list(self.tokenizer.encode(completion, add_special_tokens=False))
        # Ending on EOS teaches the adapter to stop where the user's answer stops.
        tokens = prompt_ids + completion_ids + [self.tokenizer.eos_token_id]
        return Datum.from_sequence(tokens, prompt_len=len(prompt_ids))

    # ----- HTTP handlers -----

    async def generate(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        prompt = _string(body, "prompt")
        params = SamplingParams(
            max_tokens=int(body.get("max_tokens", self.config.max_tokens)),
            temperature=float(body.get("temperature", self.config.temperature)),
        )
        out = await self.client.sample(self.config.adapter_id, list(self.tokenizer.encode(prompt)), params=params)
        sequence = out.sequences[0]
        text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        return web.json_response({"text": text, "version": out.adapter_version, "stop_reason": sequence.stop_reason})

    async def feedback(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        prompt, completion = _string(body, "prompt"), _string(body, "completion")
        correction = body.get("correction")
        rating = body.get("rating")
        if correction is None and rating is None:
            raise web.HTTPBadRequest(text="feedback needs a `rating` or a `correction`")
        if correction is not None and not isinstance(correction, str):
            raise web.HTTPBadRequest(text="`correction` must be a string")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int | float)):
            raise web.HTTPBadRequest(text="`rating` must be a number")
        self.feedbacks += 1
        target = correction if correction is not None else completion if rating >= self.config.min_rating else None
        if target is None:
            return web.json_response({"accepted": False, "reason": "low rating without a correction", **self._state()})
        self.buffer.append(self.datum(prompt, target))
        trained = await self._train_if_due()
        return web.json_response({"accepted": True, "trained": trained, **self._state()})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"adapter_id": self.config.adapter_id, "feedbacks": self.feedbacks, **self._state()})

    async def _train_if_due(self) -> bool:
        async with self._train_lock:  # one training step at a time; the next k feedbacks buffer meanwhile
            if len(self.buffer) < self.config.k:
                return False
            batch, self.buffer = self.buffer[: self.config.k], self.buffer[self.config.k :]
            fb = await self.client.forward_backward(self.config.adapter_id, batch, "cross_entropy")
            step = await self.client.optim_step(self.config.adapter_id, AdamParams(self.config.learning_rate))
            # Losses are weighted sums over tokens (Tinker's convention); report nats per trained token.
            trained_tokens = sum(float(d.weights.sum()) for d in batch)
            self.version, self.last_loss = step.version, fb.loss / max(trained_tokens, 1.0)
            self.trained_steps += 1
            return True

    def _state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "buffered": len(self.buffer),
            "trained_steps": self.trained_steps,
            "last_loss": self.last_loss,
        }


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise web.HTTPBadRequest(text=f"`{name}` must be a string")
    return value


@web.middleware
async def engine_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A bad value is the user's 400; any other engine failure (timeout, engine closed) is a 502."""
    try:
        return await handler(request)
    except InvalidRequest as err:
        return web.json_response({"error": err.code, "message": err.message}, status=400)
    except HotLoraError as err:
        return web.json_response({"error": err.code, "message": err.message}, status=502)


SERVICE = web.AppKey("service", FeedbackService)


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _delegate(name: str) -> Any:
    """A route handler that calls the service the app's startup made (routes must exist before startup)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return await getattr(request.app[SERVICE], name)(request)

    return handler


def create_app(config: FeedbackConfig, tokenizer: Any | None = None) -> web.Application:
    """The aiohttp app; the client starts with the app and closes with it."""
    app = web.Application(middlewares=[engine_errors])
    app.router.add_post("/generate", _delegate("generate"))
    app.router.add_post("/feedback", _delegate("feedback"))
    app.router.add_get("/stats", _delegate("stats"))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client = HotLoraClient(config.bootstrap, config.topic_prefix, request_timeout=config.request_timeout)
        await client.start()
        try:
            service = FeedbackService(config, client, tokenizer or load_tokenizer(config.model))
            await service.ensure_adapter()
            app[SERVICE] = service
            yield
        finally:
            await client.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    config = FeedbackConfig.from_args(argv)
    web.run_app(create_app(config), host=config.host, port=config.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
