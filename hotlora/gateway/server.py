"""The Tinker REST API over ``HotLoraClient``: an aiohttp application, one handler per endpoint.

Each handler checks the API key, reads the body (JSON, or protobuf for ``forward_backward``), and either
answers at once (sessions, ``get_info``, listings) or starts the work and answers with a future id that
``retrieve_future`` long-polls (everything that runs on the engine). A training model's requests start
in the SDK's ``seq_id`` order (``futures.Lanes``). Failures reach the SDK in its own shapes: a refused
request is an HTTP error ``{"detail": ...}``, a failed future is ``{"error", "category"}`` with Tinker's
``user`` / ``server`` category. Anything the SDK may call and the gateway does not implement answers
at once with a message that says so; nothing waits forever.

``docs/tinker.md`` lists the endpoints and fields, and where hotlora differs from Tinker's service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgspec
import numpy as np
import structlog
import torch
from aiohttp import web

from hotlora.agents import HotLoraClient
from hotlora.engine.types import AdamParams, Datum, SamplingParams
from hotlora.gateway import proto
from hotlora.gateway import tinker_api as api
from hotlora.gateway.checkpoints import CheckpointIndex
from hotlora.gateway.futures import FutureTable, Lanes
from hotlora.gateway.samplers import FrozenCopies
from hotlora.gateway.tenants import Identity, KeyMap, Tenant
from hotlora.gateway.tinker_api import Checkpoint, TinkerError
from hotlora.schemas.errors import HotLoraError

log = structlog.get_logger("hotlora.gateway")

PROTOBUF = "application/x-protobuf"
MAX_BODY_BYTES = 512 * 1024 * 1024
ALPHA = 32.0  # Tinker's LoRA alpha: fixed, whatever the rank


@dataclass
class GatewayConfig:
    bootstrap: str
    topic_prefix: str = "hotlora"
    base_model: str = ""  # the engine's model; ``hotlora gateway`` reads it from the engine's status
    keys: KeyMap | None = None
    request_timeout: float = 300.0  # per attempt of one engine request (HotLoraClient), 3 attempts
    long_poll_s: float = 20.0  # how long one retrieve_future waits before answering "try again"
    future_keep_s: float = 900.0
    gap_timeout: float = 10.0
    frozen_idle_s: float = 300.0
    frozen_per_model: int = 4
    follow_checkpoints: bool = True


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = config.keys or KeyMap()
        self.futures = FutureTable(config.future_keep_s)
        self.lanes = Lanes(config.gap_timeout)
        self.frozen = FrozenCopies(config.frozen_idle_s, config.frozen_per_model)
        self.checkpoints = CheckpointIndex()
        self._tenants: dict[str, asyncio.Future[Tenant]] = {}
        self._sessions: dict[str, float] = {}  # session id -> last heartbeat (monotonic)
        self._scorers: dict[str, asyncio.Future[str]] = {}  # principal -> its base-model scoring adapter
        self._background: list[asyncio.Task[None]] = []
        self._events_client: HotLoraClient | None = None
        self.stats: Counter[str] = Counter()  # requests by kind and encoding, for logs and tests

    # ----- lifecycle -----

    async def start(self) -> None:
        self._background.append(asyncio.create_task(self.frozen.sweep_forever()))
        if self.config.follow_checkpoints:
            self._events_client = await self._new_client(None).start()
            self._background.append(asyncio.create_task(self.checkpoints.follow(self._events_client)))

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.futures.close()
        await self.frozen.close()
        tenants = [t.result() for t in self._tenants.values() if t.done() and not t.exception()]
        for client in [t.client for t in tenants] + ([self._events_client] if self._events_client else []):
            await client.close()

    def _new_client(self, identity: Identity | None) -> HotLoraClient:
        # The reply topic is named after the client: a digest keeps any principal within topic-name characters.
        suffix = hashlib.sha256(identity.principal.encode()).hexdigest()[:16] if identity else "events"
        return HotLoraClient(
            self.config.bootstrap,
            self.config.topic_prefix,
            client_id=f"gw-{self.futures.gateway_id}-{suffix}",
            request_timeout=self.config.request_timeout,
            max_in_flight=4096,
            principal=identity.principal if identity else "",
            token=identity.token if identity else "",
        )

    async def tenant(self, identity: Identity) -> Tenant:
        """The identity's client, started once; concurrent first calls share the start."""
        pending = self._tenants.get(identity.principal)
        if pending is None or (pending.done() and pending.exception() is not None):
            pending = self._tenants[identity.principal] = asyncio.ensure_future(self._start_tenant(identity))
        return await pending

    async def _start_tenant(self, identity: Identity) -> Tenant:
        client = await self._new_client(identity).start()
        return Tenant(identity, client)

    # ----- the shared paths -----

    def check_base_model(self, name: str | None) -> None:
        base = self.config.base_model
        if name is None or name == base:
            return
        if os.path.realpath(name) == os.path.realpath(base) or os.path.basename(name.rstrip("/")) == os.path.basename(
            base.rstrip("/")
        ):
            return
        raise TinkerError(f"base model {name!r} is not served here; this gateway serves {base!r}")

    def start_work(self, identity: Identity, work: Callable[[Tenant], Awaitable[Any]], lane: str | None = None,
                   seq_id: int | None = None) -> str:  # fmt: skip
        """Run ``work(tenant)`` as a future, after the lane's earlier requests have started; returns its id."""
        entry = self.futures.create(identity.principal)

        async def run() -> Any:
            tenant = await self.tenant(identity)
            if lane is not None and (ready := tenant.ready(lane)) is not None:
                await ready
            return await work(tenant)

        if lane is None:
            self.futures.run(entry, run())
        else:
            self.lanes.admit(lane, seq_id, lambda: self.futures.run(entry, run()))
        return entry.request_id

    def refuse_in_lane(self, lane: str, seq_id: int | None, err: TinkerError) -> TinkerError:
        """A request refused before it could start must not hold up its successors."""
        self.lanes.skip(lane, seq_id)
        return err

    async def visible(self, tenant: Tenant, adapter_id: str) -> Any | None:
        """The adapter's info if this tenant may use it (``list_adapters`` shows only what a principal may use)."""
        infos = await tenant.client.list_adapters(adapter_id)
        return next((info for info in infos if info.adapter_id == adapter_id), None)

    # ----- models -----

    def create_model(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        model_id = api.model_id_of(api.field_of(body, "session_id", str), api.field_of(body, "model_seq_id", int))
        adapter_id = api.adapter_of(model_id)
        self.check_base_model(api.field_of(body, "base_model", str, None))
        lora = api.field_of(body, "lora_config", dict, None) or {"rank": 32}
        rank = api.field_of(lora, "rank", int)
        seed = api.field_of(lora, "seed", int, None)
        attn, mlp = bool(lora.get("train_attn", True)), bool(lora.get("train_mlp", True))
        if not (attn or mlp):
            raise api.unsupported("training only the unembedding (train_attn and train_mlp both false)")
        targets = "all-linear" if attn and mlp else ("attention" if attn else "mlp")
        optimizer = api.field_of(body, "optimizer_config", dict, None) or {}
        if optimizer.get("type", "adamw") != "adamw":
            raise api.unsupported(f"optimizer {optimizer.get('type')!r} (only adamw)")
        seed = secrets.randbits(31) if seed is None else seed

        async def work(tenant: Tenant) -> dict[str, Any]:
            tenant.created(adapter_id)
            try:
                await tenant.client.create_adapter(adapter_id, rank=rank, alpha=ALPHA, targets=targets, seed=seed)
            except HotLoraError as err:
                # A retried POST: the adapter is there already and it is this tenant's.
                if err.code != "adapter_exists" or await self.visible(tenant, adapter_id) is None:
                    raise
            log.info("model_created", model_id=model_id, rank=rank, targets=targets, principal=identity.principal)
            return {"model_id": model_id, "type": "create_model"}

        return {"request_id": self.start_work(identity, work), "model_id": model_id}

    async def get_info(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        model_id = api.field_of(body, "model_id", str)
        info = await self.visible(await self.tenant(identity), api.adapter_of(model_id))
        if info is None:
            raise TinkerError(f"model {model_id!r} not found", status=404)
        base = self.config.base_model
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {"model_name": base, "tokenizer_id": base},
            "is_lora": True,
            "lora_rank": info.rank,
            "model_name": base,
        }

    def unload_model(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        model_id = api.field_of(body, "model_id", str)
        adapter_id = api.adapter_of(model_id)

        async def work(tenant: Tenant) -> dict[str, Any]:
            await tenant.client.delete_adapter(adapter_id)
            self.frozen.retire_model(model_id)
            self.lanes.forget(adapter_id)
            return {"model_id": model_id, "type": "unload_model"}

        return {"request_id": self.start_work(identity, work, lane=adapter_id), "model_id": model_id}

    # ----- training -----

    def forward_backward(self, identity: Identity, request: api.FwdBwd) -> dict[str, Any]:
        adapter_id = api.adapter_of(request.model_id)
        try:
            config = api.engine_loss_config(request.loss_fn, request.loss_fn_config)
            if not request.data:
                raise TinkerError("forward_backward needs at least one datum")
            for i, datum in enumerate(request.data):
                api.check_datum(request.loss_fn, i, datum)
            # Top-K targets (N, K): K datums over the same input (api.columns); their results are joined below.
            columns = [api.columns(d) for d in request.data]
            datums = [self._engine_datum(c) for cols in columns for c in cols]
        except TinkerError as err:
            raise self.refuse_in_lane(adapter_id, request.seq_id, err) from None
        except HotLoraError as err:  # Datum.create's checks (negative ids, NaNs)
            raise self.refuse_in_lane(adapter_id, request.seq_id, TinkerError(err.message)) from None

        async def work(tenant: Tenant) -> api.FwdBwdResult:
            # ``forward`` is the engine's forward-only call: the same losses and logprobs, no gradient.
            verb = tenant.client.forward if request.forward_only else tenant.client.forward_backward
            out = await verb(adapter_id, datums, request.loss_fn, config)
            column_lps, column_losses = [lp.numpy() for lp in out.logprobs], list(out.losses)
            logprobs, losses, at = [], [], 0
            for cols, datum in zip(columns, request.data, strict=True):
                k = len(cols)
                two_d = datum.inputs["target_tokens"].ndim == 2
                logprobs.append(np.stack(column_lps[at : at + k], axis=1) if two_d else column_lps[at])
                losses.append(float(sum(column_losses[at : at + k])))
                at += k
            return api.FwdBwdResult(logprobs, losses)

        return {"request_id": self.start_work(identity, work, adapter_id, request.seq_id), "model_id": request.model_id}

    @staticmethod
    def _engine_datum(datum: api.TDatum) -> Datum:
        inputs = datum.inputs

        def tensor(values: np.ndarray | None) -> torch.Tensor | None:
            return None if values is None else torch.from_numpy(np.array(values))  # a writable copy

        return Datum.create(
            tensor(datum.tokens),
            tensor(inputs["target_tokens"]),
            tensor(inputs.get("weights")),
            tensor(inputs.get("logprobs")),
            tensor(inputs.get("advantages")),
            clip_low_threshold=tensor(api.per_token(datum, "clip_low_threshold")),
            clip_high_threshold=tensor(api.per_token(datum, "clip_high_threshold")),
            sequence_ratio_mask=tensor(inputs.get("sequence_ratio_mask")),
        )

    def optim_step(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        model_id = api.field_of(body, "model_id", str)
        adapter_id = api.adapter_of(model_id)
        seq_id = api.field_of(body, "seq_id", int, None)
        try:
            params = body.get("optim_params", body.get("adam_params"))
            if not isinstance(params, dict):
                raise TinkerError("missing field 'optim_params' (AdamParams)")
            if params.get("type", "adam") not in ("adam", "adamw"):
                raise api.unsupported(f"optimizer parameters of type {params.get('type')!r} (only AdamParams)")
            known = {"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}
            values = {k: v for k, v in params.items() if k in known}
            # The SDK's defaults, grad_clip_norm 0.0 (no clipping) included, whatever the engine's are.
            defaults = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
                        "grad_clip_norm": 0.0}  # fmt: skip
            adam = AdamParams(**{**defaults, **values})
        except TinkerError as err:
            raise self.refuse_in_lane(adapter_id, seq_id, err) from None
        except (HotLoraError, TypeError) as err:
            raise self.refuse_in_lane(adapter_id, seq_id, TinkerError(str(err))) from None

        async def work(tenant: Tenant) -> dict[str, Any]:
            out = await tenant.client.optim_step(adapter_id, adam)
            return {"metrics": {"grad_norm": out.grad_norm, "version": float(out.version)}, "type": "optim_step"}

        return {"request_id": self.start_work(identity, work, adapter_id, seq_id), "model_id": model_id}

    # ----- checkpoints -----

    def _save(self, identity: Identity, body: dict[str, Any], kind: str) -> dict[str, Any]:
        model_id = api.field_of(body, "model_id", str)
        adapter_id = api.adapter_of(model_id)
        seq_id = api.field_of(body, "seq_id", int, None)
        name = api.field_of(body, "path", str, None)
        session_seq = api.field_of(body, "sampling_session_seq_id", int, None)
        try:
            if kind == "weights" or name is not None:
                checkpoint = Checkpoint(
                    model_id, kind, api.check_name(name or f"ckpt-{seq_id or secrets.token_hex(4)}")
                )
                sampling_id = None
            else:  # save_weights_and_get_sampling_client: an unnamed sampler checkpoint and a sampling session
                checkpoint = Checkpoint(model_id, kind, f"{api.EPHEMERAL}{seq_id or 0}-{secrets.token_hex(3)}")
                sampling_id = api.sampling_session_id(
                    api.session_of(model_id), session_seq or 0, checkpoint.tinker_path
                )
        except TinkerError as err:
            raise self.refuse_in_lane(adapter_id, seq_id, err) from None
        principal = identity.principal

        async def work(tenant: Tenant) -> dict[str, Any]:
            path = checkpoint.storage_path(principal)
            await tenant.client.save_state(adapter_id, path, include_optimizer=kind == "weights")
            self.checkpoints.record(api.principal_dir(principal), checkpoint)
            if kind == "weights":
                return {"path": checkpoint.tinker_path, "type": "save_weights"}
            self.frozen.invalidate(principal, checkpoint)
            if sampling_id is not None:
                await self.frozen.load(tenant, checkpoint)
            reply = {"path": checkpoint.tinker_path, "type": "save_weights_for_sampler"}
            return reply | ({"sampling_session_id": sampling_id} if sampling_id else {})

        return {"request_id": self.start_work(identity, work, adapter_id, seq_id), "model_id": model_id}

    def load_weights(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        checkpoint = Checkpoint.parse(api.field_of(body, "path", str))
        model_id = api.field_of(body, "model_id", str, None)
        seq_id = api.field_of(body, "seq_id", int, None)
        new_model = model_id is None
        if new_model:  # create_training_client_from_state: the model is made from the checkpoint
            model_id = api.model_id_of(api.field_of(body, "session_id", str), api.field_of(body, "model_seq_id", int))
            self.check_base_model(api.field_of(body, "base_model", str, None))
        adapter_id = api.adapter_of(model_id)
        path = checkpoint.storage_path(identity.principal)

        async def work(tenant: Tenant) -> dict[str, Any]:
            if new_model:
                tenant.created(adapter_id)
            # The engine restores the optimizer state whenever the checkpoint has it, including for
            # load_state without optimizer (docs/tinker.md).
            try:
                await tenant.client.load_state(adapter_id, path)
            except HotLoraError as err:
                if err.code == "checkpoint_error":
                    raise api.missing(checkpoint) from None
                raise
            return {"path": checkpoint.tinker_path, "model_id": model_id, "type": "load_weights"}

        lane = None if new_model else adapter_id
        return {"request_id": self.start_work(identity, work, lane, seq_id), "model_id": model_id}

    async def weights_info(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        checkpoint = Checkpoint.parse(api.field_of(body, "tinker_path", str))
        tenant = await self.tenant(identity)
        info = await self.visible(tenant, checkpoint.adapter_id)
        if info is None:  # the training model is gone: read the rank by loading the checkpoint once
            probe = f"{checkpoint.adapter_id}.wi-{secrets.token_hex(4)}"
            tenant.created(probe)
            try:
                info = await tenant.client.load_state(probe, checkpoint.storage_path(identity.principal))
            except HotLoraError as err:
                if err.code != "checkpoint_error":
                    raise
                raise api.missing(checkpoint) from None
            await tenant.client.delete_adapter(probe)
        return {
            "base_model": self.config.base_model,
            "is_lora": True,
            "lora_rank": info.rank,
            "train_attn": any(t in info.targets for t in ("q_proj", "o_proj")),
            "train_mlp": any(t in info.targets for t in ("up_proj", "down_proj")),
            "train_unembed": False,
        }

    async def list_checkpoints(self, identity: Identity, model_id: str) -> dict[str, Any]:
        adapter_id = api.adapter_of(model_id)
        owner = api.principal_dir(identity.principal)
        if (
            not self.checkpoints.known(owner, model_id)
            and await self.visible(await self.tenant(identity), adapter_id) is None
        ):
            raise TinkerError(f"model {model_id!r} not found", status=404)
        return {"checkpoints": [s.json() for s in self.checkpoints.list(owner, model_id)], "cursor": None}

    async def training_runs(self, identity: Identity, model_id: str | None, offset: int, limit: int) -> dict[str, Any]:
        tenant = await self.tenant(identity)
        infos = await tenant.client.list_adapters(api.adapter_of(model_id) if model_id else "")
        runs = []
        for info in infos:
            run_id = api.model_of(info.adapter_id)
            if run_id is None or (model_id is not None and run_id != model_id):
                continue
            runs.append({
                "training_run_id": run_id, "base_model": self.config.base_model, "model_owner": identity.principal,
                "is_lora": True, "corrupted": False, "lora_rank": info.rank, "last_request_time": _now_iso(),
                "last_checkpoint": None, "last_sampler_checkpoint": None, "user_metadata": None,
            })  # fmt: skip
        if model_id is not None:
            if not runs:
                raise TinkerError(f"model {model_id!r} not found", status=404)
            return runs[0]
        page = runs[offset : offset + limit]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    # ----- sampling -----

    def create_sampling_session(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        session_id = api.check_session(api.field_of(body, "session_id", str))
        seq = api.field_of(body, "sampling_session_seq_id", int)
        model_path = api.field_of(body, "model_path", str, None)
        if model_path is None:
            self.check_base_model(api.field_of(body, "base_model", str, None))
        else:
            Checkpoint.parse(model_path)
        return {
            "type": "create_sampling_session",
            "sampling_session_id": api.sampling_session_id(session_id, seq, model_path),
        }

    def get_sampler(self, sampling_id: str) -> dict[str, Any]:
        target = api.sampling_target(sampling_id)
        return {
            "sampler_id": sampling_id,
            "base_model": self.config.base_model,
            "model_path": None if target is None else target.tinker_path,
        }

    def asample(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("sampling_session_id") is not None:
            target = api.sampling_target(api.field_of(body, "sampling_session_id", str))
        elif body.get("model_path") is not None:
            target = Checkpoint.parse(api.field_of(body, "model_path", str))
        else:
            self.check_base_model(api.field_of(body, "base_model", str, None))
            target = None
        tinker_params = api.sample_params(body)
        prompt = api.tokens_from_json(body.get("prompt"), "prompt").tolist()
        n = api.field_of(body, "num_samples", int, 1)
        if not prompt:
            raise TinkerError("the prompt is empty")
        score_last = api.prompt_logprobs_request(body, len(prompt))
        try:
            params = SamplingParams(
                max_tokens=tinker_params.max_tokens, temperature=tinker_params.temperature, top_p=tinker_params.top_p,
                top_k=tinker_params.top_k, stop=tinker_params.stop, seed=tinker_params.seed,
            )  # fmt: skip
        except HotLoraError as err:
            raise TinkerError(err.message) from None
        if n < 1:
            raise TinkerError(f"num_samples must be >= 1, got {n}")

        async def work(tenant: Tenant) -> api.SampleResult:
            async def sample(adapter_id: str | None) -> tuple[Any, np.ndarray | None]:
                sampled = tenant.client.sample(adapter_id, prompt, n, params)
                if score_last is None:
                    return await sampled, None
                scorer = adapter_id or await self._base_scorer(tenant)
                return await asyncio.gather(sampled, self._prompt_logprobs(tenant, scorer, prompt, score_last))

            out, prompt_lp = await (sample(None) if target is None else self.frozen.use(tenant, target, sample))
            sequences = [
                proto.OutSequence(np.asarray(s.tokens, np.int32), np.asarray(s.logprobs, np.float32), s.stop_reason)
                for s in out.sequences
            ]
            return api.SampleResult(sequences, prompt_lp)

        request_id = self.start_work(identity, work)
        return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(n)]}

    @staticmethod
    async def _prompt_logprobs(tenant: Tenant, adapter_id: str, prompt: list[int], last_n: int) -> np.ndarray:
        """The prompt's logprobs under ``adapter_id``: a forward-only call through the trainer (the logprobs, no
        gradient), NaN for the first token and any before ``last_n``."""
        scored = np.full(len(prompt), np.nan, dtype=np.float32)
        if last_n > 0:
            datum = Datum.create(prompt[:-1], prompt[1:])
            out = await tenant.client.forward(adapter_id, [datum], "cross_entropy")
            scored[len(prompt) - last_n :] = out.logprobs[0].numpy()[-last_n:]
        return scored

    async def _base_scorer(self, tenant: Tenant) -> str:
        """An adapter that is the base model exactly (LoRA's B starts at zero and is never trained), on which
        the tenant's base-model sampling clients score prompts; made once per tenant, shared by gateways."""
        pending = self._scorers.get(tenant.identity.principal)
        if pending is None or (pending.done() and pending.exception() is not None):
            pending = self._scorers[tenant.identity.principal] = asyncio.ensure_future(self._make_scorer(tenant))
        return await pending

    @staticmethod
    async def _make_scorer(tenant: Tenant) -> str:
        adapter_id = f"base-{hashlib.sha256(tenant.identity.principal.encode()).hexdigest()[:16]}.scorer"
        if await tenant.client.resume(adapter_id) is None:
            tenant.created(adapter_id)
            try:
                await tenant.client.create_adapter(adapter_id, rank=1, alpha=1.0, targets=("q_proj",))
            except HotLoraError as err:
                if err.code != "adapter_exists":  # else another gateway made it first
                    raise
        tenant.created(adapter_id)
        return adapter_id

    # ----- sessions -----

    def create_session(self, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
        session_id = api.new_session_id()
        self._sessions[session_id] = time.monotonic()
        log.info("session_created", session_id=session_id, principal=identity.principal, sdk=body.get("sdk_version"))
        return {"type": "create_session", "session_id": session_id}

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        self._sessions[api.check_session(api.field_of(body, "session_id", str))] = time.monotonic()
        return {"type": "session_heartbeat"}

    def finish_session(self, identity: Identity, session_id: str) -> None:
        api.check_session(session_id)
        self._sessions.pop(session_id, None)
        for model_id in {c.model_id for c in self.frozen.checkpoints_of(identity.principal)}:
            if api.session_of(model_id) == session_id:
                self.frozen.retire_model(model_id)

    # ----- futures -----

    async def retrieve(self, identity: Identity, body: dict[str, Any], accept: str) -> web.Response:
        entry = self.futures.get(api.field_of(body, "request_id", str), identity.principal)
        if not await self.futures.wait(entry, self.config.long_poll_s):
            return _json({"type": "try_again", "request_id": entry.request_id, "queue_state": "active"}, status=408)
        err = entry.future.exception()
        if err is not None:
            return _json(_failure(err))
        result = entry.future.result()
        if isinstance(result, api.PROTOBUF_RESULTS):
            if PROTOBUF in accept:
                return web.Response(body=result.protobuf(), content_type=PROTOBUF)
            return _json(result.json())
        return _json(result)


def _failure(err: BaseException) -> dict[str, str]:
    """A failed future in Tinker's shape: the message and its ``RequestErrorCategory``."""
    if isinstance(err, TinkerError):
        return {"error": err.message, "category": err.category}
    if isinstance(err, HotLoraError):
        return {"error": f"[{err.code}] {err.message}", "category": api.category_of(err.code)}
    log.error("request_crashed", error=repr(err))
    return {"error": f"internal error: {err!r}", "category": api.SERVER}


# ----- HTTP -----

CLIENT_CONFIG = {
    # Server-side flags the SDK asks for at start (tinker ClientConfigResponse); unknown ones are ignored.
    "pjwt_auth_enabled": False,
    "parallel_fwdbwd_chunks": False,  # chunks of one forward_backward go one after another, in seq order
    "proto_compress_fwdbwd": False,
    "proto_write_fwdbwd": False,  # SDKs that can choose (0.2x) send JSON; later ones always send protobuf
    "fwd_via_fwdbwd": False,
    "sample_use_retrieve_futures": False,  # each sample polls retrieve_future (retrieve_futures: not served)
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
    "create_model_via_load_weights": True,
}


def build_app(gateway: Gateway) -> web.Application:
    """The aiohttp application; ``gateway.start()`` / ``close()`` run with the app's startup and cleanup."""

    async def body_of(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "zstd":
            raw = _unzstd(raw)
        if not raw:
            return {}
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as err:
            raise TinkerError(f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise TinkerError("the request body must be a JSON object")
        return body

    def identity_of(request: web.Request) -> Identity:
        return gateway.keys.identify(request.headers.get("X-API-Key"))

    def post(handler: Callable[[Identity, dict[str, Any]], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def route(request: web.Request) -> web.Response:
            identity = identity_of(request)
            result = handler(identity, await body_of(request))
            if asyncio.iscoroutine(result):
                result = await result
            return _json(result)

        return route

    async def forward_backward(request: web.Request) -> web.Response:
        identity = identity_of(request)
        protobuf = PROTOBUF in request.headers.get("Content-Type", "")
        gateway.stats[f"forward_backward:{'protobuf' if protobuf else 'json'}"] += 1
        if protobuf:
            raw = await request.read()
            if request.headers.get("Content-Encoding", "").lower() == "zstd":
                raw = _unzstd(raw)
            parsed = api.fwdbwd_from_proto(raw)
        else:
            parsed = api.fwdbwd_from_json(await body_of(request), forward_only=request.path.endswith("/forward"))
        return _json(gateway.forward_backward(identity, parsed))

    async def retrieve_future(request: web.Request) -> web.Response:
        return await gateway.retrieve(identity_of(request), await body_of(request), request.headers.get("Accept", ""))

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def capabilities(request: web.Request) -> web.Response:
        identity_of(request)
        model = {"model_name": gateway.config.base_model, "trainable": True, "sampleable": True}
        return _json({"supported_models": [model]})

    async def client_config(request: web.Request) -> web.Response:
        return _json(CLIENT_CONFIG)

    async def dynamic_config(request: web.Request) -> web.Response:
        return _json({})

    async def telemetry(request: web.Request) -> web.Response:
        return _json({"status": "accepted"})

    async def heartbeat(request: web.Request) -> web.Response:
        identity_of(request)
        return _json(gateway.heartbeat(await body_of(request)))

    async def finish_session(request: web.Request) -> web.Response:
        gateway.finish_session(identity_of(request), request.match_info["session_id"])
        return _json(None)

    async def cancel_future(request: web.Request) -> web.Response:
        identity_of(request)  # the engine cannot stop a started request; the result is dropped unread
        return _json(None)

    async def get_sampler(request: web.Request) -> web.Response:
        identity_of(request)
        return _json(gateway.get_sampler(request.match_info["sampler_id"]))

    async def list_checkpoints(request: web.Request) -> web.Response:
        return _json(await gateway.list_checkpoints(identity_of(request), request.match_info["model_id"]))

    async def training_runs(request: web.Request) -> web.Response:
        query = request.rel_url.query
        try:
            offset, limit = int(query.get("offset", 0)), int(query.get("limit", 20))
        except ValueError:
            raise TinkerError("offset and limit must be integers") from None
        model_id = request.match_info.get("model_id")
        return _json(await gateway.training_runs(identity_of(request), model_id, offset, limit))

    async def not_supported(request: web.Request) -> web.Response:
        raise TinkerError(
            f"{request.method} {request.path} is not supported by the hotlora gateway (see docs/tinker.md)", status=404
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    v1 = "/api/v1"
    app.router.add_get(f"{v1}/healthz", healthz)
    app.router.add_get(f"{v1}/get_server_capabilities", capabilities)
    app.router.add_post(f"{v1}/client/config", client_config)
    app.router.add_post(f"{v1}/client/dynamic_config", dynamic_config)
    app.router.add_post(f"{v1}/telemetry", telemetry)
    app.router.add_post(f"{v1}/create_session", post(gateway.create_session))
    app.router.add_post(f"{v1}/session_heartbeat", heartbeat)
    app.router.add_post(f"{v1}/sessions/{{session_id}}/finish", finish_session)
    app.router.add_post(f"{v1}/create_model", post(gateway.create_model))
    app.router.add_post(f"{v1}/get_info", post(gateway.get_info))
    app.router.add_post(f"{v1}/unload_model", post(gateway.unload_model))
    app.router.add_post(f"{v1}/forward_backward", forward_backward)
    app.router.add_post(f"{v1}/forward", forward_backward)
    app.router.add_post(f"{v1}/optim_step", post(gateway.optim_step))
    app.router.add_post(f"{v1}/save_weights", post(lambda i, b: gateway._save(i, b, "weights")))
    app.router.add_post(f"{v1}/save_weights_for_sampler", post(lambda i, b: gateway._save(i, b, "sampler_weights")))
    app.router.add_post(f"{v1}/load_weights", post(gateway.load_weights))
    app.router.add_post(f"{v1}/weights_info", post(gateway.weights_info))
    app.router.add_post(f"{v1}/create_sampling_session", post(gateway.create_sampling_session))
    app.router.add_get(f"{v1}/samplers/{{sampler_id}}", get_sampler)
    app.router.add_post(f"{v1}/asample", post(gateway.asample))
    app.router.add_post(f"{v1}/retrieve_future", retrieve_future)
    app.router.add_post(f"{v1}/cancel_future", cancel_future)
    app.router.add_get(f"{v1}/training_runs", training_runs)
    app.router.add_get(f"{v1}/training_runs/{{model_id}}", training_runs)
    app.router.add_get(f"{v1}/training_runs/{{model_id}}/checkpoints", list_checkpoints)
    app.router.add_route("*", "/{tail:.*}", not_supported)

    async def on_startup(_: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_: web.Application) -> None:
        await gateway.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every refusal in the shape the SDK reads into its exception message: ``{"detail": ...}``."""
    try:
        return await handler(request)
    except TinkerError as err:
        return _json({"detail": err.message}, status=err.status)
    except HotLoraError as err:
        status = 403 if err.code == "forbidden" else 404 if err.code == "unknown_adapter" else 400
        if api.category_of(err.code) == api.SERVER:
            status = 503
        return _json({"detail": f"[{err.code}] {err.message}"}, status=status)
    except web.HTTPException:
        raise
    except Exception as err:  # a bug here must not look like a hang or a dropped connection
        log.exception("handler_crashed", path=request.path)
        return _json({"detail": f"internal error: {err!r}"}, status=500)


def _unzstd(raw: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise TinkerError("zstd-compressed bodies need the zstandard package on the gateway", status=415) from None
    with contextlib.suppress(zstandard.ZstdError):
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_BODY_BYTES)
    raise TinkerError("the zstd-compressed body does not decompress")
