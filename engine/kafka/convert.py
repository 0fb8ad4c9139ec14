"""Wire messages <-> the engine's in-process types, so one verb means the same thing on both sides.

It lives in the Kafka edge, the one layer that knows both sides: ``hotlora.schemas`` stays free of the
engine and of torch, and the engine core never sees a wire message. Semantic validation happens in the
engine's own constructors (``LoraSpec``, ``SamplingParams``, ``Datum.create``...), which raise
``InvalidRequest``; this module only reshapes.

No torch at import time (it is imported where a tensor is made): the edge imports before torch, so an
engine joins its consumer group while torch is still importing (``engine.kafka.service``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hotlora.engine import types as eng
from hotlora.engine.types import AdamParams, ForwardBackwardOutput, LoraSpec, OptimStepOutput, SamplingParams
from hotlora.engine.types import AdapterInfo as EngineAdapterInfo
from hotlora.engine.types import Datum as EngineDatum
from hotlora.engine.types import SampledSequence as EngineSampledSequence
from hotlora.schemas import messages as wire
from hotlora.schemas.arrays import pack_f32, pack_i32, unpack_f32, unpack_i32
from hotlora.schemas.errors import ERROR_CODES, HotLoraError, InternalError, InvalidRequest

if TYPE_CHECKING:
    import torch

# ----- requests -----

# Guards for values the engine's scheduler cannot cost safely: its fair queue works in float tokens, and a
# sample of 2**63 max_tokens, or an adapter weight of 5e-324, stalls its busy loop for every tenant before
# the sampler's own checks run. Far beyond any real request, so they only stop hostile ones.
MAX_SAMPLE_TOKENS = 2**31 - 1
ADAPTER_WEIGHT_RANGE = (1e-6, 1e6)


def _guard(message: wire.RequestMessage) -> None:
    if isinstance(message, wire.Sample) and message.max_tokens > MAX_SAMPLE_TOKENS:
        raise InvalidRequest(f"max_tokens must be at most {MAX_SAMPLE_TOKENS}, got {message.max_tokens}")
    if isinstance(message, wire.CreateAdapter):
        low, high = ADAPTER_WEIGHT_RANGE
        if not low <= message.weight <= high:  # also refuses NaN
            raise InvalidRequest(f"adapter weight must lie in [{low:g}, {high:g}], got {message.weight!r}")


def to_engine(message: wire.RequestMessage) -> eng.Request:
    """The engine request for a wire request; raises the engine's ``InvalidRequest`` for bad values."""
    _guard(message)
    rid, adapter_id = message.request_id, message.adapter_id
    if isinstance(message, wire.CreateAdapter):
        targets = message.targets if isinstance(message.targets, str) else tuple(message.targets)
        spec = LoraSpec(rank=message.rank, alpha=message.alpha, targets=targets, seed=message.seed)
        return eng.CreateAdapter(adapter_id, spec, message.weight, request_id=rid)
    if isinstance(message, wire.DeleteAdapter):
        return eng.DeleteAdapter(adapter_id, request_id=rid)
    if isinstance(message, wire.ListAdapters):
        return eng.ListAdapters(request_id=rid, adapter_id=message.adapter_id)
    if isinstance(message, wire.Sample):
        params = SamplingParams(
            max_tokens=message.max_tokens,
            temperature=message.temperature,
            top_p=message.top_p,
            top_k=message.top_k,
            stop=tuple(message.stop),
            seed=message.seed,
        )
        prompt = unpack_i32(message.prompt_tokens).tolist()
        return eng.Sample(adapter_id or None, prompt, message.n, params, request_id=rid)
    if isinstance(message, wire.ForwardBackward):
        datums = [_datum_to_engine(d) for d in message.datums]
        return eng.ForwardBackward(
            adapter_id,
            datums,
            message.loss_fn,
            dict(message.loss_config),
            request_id=rid,
            forward_only=message.forward_only,
        )
    if isinstance(message, wire.OptimStep):
        params = AdamParams(
            learning_rate=message.learning_rate,
            beta1=message.beta1,
            beta2=message.beta2,
            eps=message.eps,
            weight_decay=message.weight_decay,
            grad_clip_norm=message.grad_clip_norm,
        )
        return eng.OptimStep(adapter_id, params, request_id=rid)
    if isinstance(message, wire.SaveState):
        return eng.SaveState(adapter_id, message.path, message.include_optimizer, request_id=rid)
    if isinstance(message, wire.LoadState):
        return eng.LoadState(adapter_id, message.path, request_id=rid)
    raise InvalidRequest(f"{type(message).__name__} is not a request")


def to_wire(
    request: eng.Request,
    *,
    seq: int = 0,
    reply_to: str = "",
    sent_at_ms: int | None = None,
    principal: str = "",
    token: str = "",
) -> wire.RequestMessage:
    """The wire message for an engine request (what an agent SDK publishes)."""
    envelope: dict[str, Any] = {"request_id": request.request_id, "seq": seq, "reply_to": reply_to}
    if principal or token:
        envelope.update(principal=principal, token=token)
    if sent_at_ms is not None:
        envelope["sent_at_ms"] = sent_at_ms
    if isinstance(request, eng.CreateAdapter):
        spec = request.spec
        targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
        return wire.CreateAdapter(
            adapter_id=request.adapter_id,
            rank=spec.rank,
            alpha=float(spec.alpha),
            targets=targets,
            seed=spec.seed,
            weight=float(request.weight),
            **envelope,
        )
    if isinstance(request, eng.DeleteAdapter):
        return wire.DeleteAdapter(adapter_id=request.adapter_id, **envelope)
    if isinstance(request, eng.ListAdapters):
        return wire.ListAdapters(adapter_id=request.adapter_id, **envelope)
    if isinstance(request, eng.Sample):
        p = request.params
        return wire.Sample(
            adapter_id=request.adapter_id or "",
            prompt_tokens=pack_i32(request.prompt_tokens),
            n=request.n,
            max_tokens=p.max_tokens,
            temperature=float(p.temperature),
            top_p=float(p.top_p),
            top_k=p.top_k,
            stop=list(p.stop),
            seed=p.seed,
            **envelope,
        )
    if isinstance(request, eng.ForwardBackward):
        return wire.ForwardBackward(
            adapter_id=request.adapter_id,
            datums=[_datum_to_wire(d) for d in request.datums],
            loss_fn=request.loss_fn,
            loss_config={k: float(v) for k, v in request.loss_config.items()},
            forward_only=request.forward_only,
            **envelope,
        )
    if isinstance(request, eng.OptimStep):
        a = request.params
        return wire.OptimStep(
            adapter_id=request.adapter_id,
            learning_rate=a.learning_rate,
            beta1=a.beta1,
            beta2=a.beta2,
            eps=a.eps,
            weight_decay=a.weight_decay,
            grad_clip_norm=a.grad_clip_norm,
            **envelope,
        )
    if isinstance(request, eng.SaveState):
        return wire.SaveState(
            adapter_id=request.adapter_id,
            path=str(request.path),
            include_optimizer=request.include_optimizer,
            **envelope,
        )
    if isinstance(request, eng.LoadState):
        return wire.LoadState(adapter_id=request.adapter_id, path=str(request.path), **envelope)
    raise InvalidRequest(f"{type(request).__name__} is not an engine request")


def _datum_to_engine(datum: wire.Datum) -> EngineDatum:
    def floats(data: bytes | None) -> torch.Tensor | None:
        return None if data is None else _floats(data)

    return EngineDatum.create(
        _ints(datum.input_tokens),
        _ints(datum.target_tokens),
        floats(datum.weights),
        floats(datum.logprobs),
        floats(datum.advantages),
        clip_low_threshold=floats(datum.clip_low_threshold),
        clip_high_threshold=floats(datum.clip_high_threshold),
        sequence_ratio_mask=floats(datum.sequence_ratio_mask),
    )


def _datum_to_wire(datum: EngineDatum) -> wire.Datum:
    def floats(tensor: torch.Tensor | None) -> bytes | None:
        return None if tensor is None else pack_f32(_flat(tensor))

    return wire.Datum(
        input_tokens=pack_i32(_flat(datum.input_tokens)),
        target_tokens=pack_i32(_flat(datum.target_tokens)),
        weights=floats(datum.weights),
        logprobs=floats(datum.logprobs),
        advantages=floats(datum.advantages),
        clip_low_threshold=floats(datum.clip_low_threshold),
        clip_high_threshold=floats(datum.clip_high_threshold),
        sequence_ratio_mask=floats(datum.sequence_ratio_mask),
    )


def _flat(tensor: torch.Tensor) -> list[Any]:
    return tensor.detach().to("cpu").reshape(-1).tolist()


def _ints(data: bytes) -> torch.Tensor:
    """A packed int32 array as an int64 tensor (what torch token tensors use)."""
    import torch

    values = unpack_i32(data)
    return torch.frombuffer(values, dtype=torch.int32).to(torch.int64) if values else torch.zeros(0, dtype=torch.int64)


def _floats(data: bytes) -> torch.Tensor:
    """A packed float32 array as a float32 tensor of its own (not a view of the message's bytes)."""
    import torch

    values = unpack_f32(data)
    return torch.frombuffer(values, dtype=torch.float32).clone() if values else torch.zeros(0)


# ----- results -----


def from_engine(
    request: wire.RequestMessage, result: Any, *, received_at_ms: int = 0, finished_at_ms: int | None = None
) -> wire.ResultMessage:
    """The reply to ``request`` for what the engine returned (or raised) for it.

    The reply echoes the request's envelope (``request_id``, ``adapter_id``, ``seq``, ``reply_to``) so the
    agent can correlate it without state. An exception becomes an ``error``: a typed ``HotLoraError``
    keeps its code, anything else is ``internal``, because the edge must answer every request.
    """
    envelope: dict[str, Any] = {
        "request_id": request.request_id,
        "adapter_id": request.adapter_id,
        "seq": request.seq,
        "reply_to": request.reply_to,
        "received_at_ms": received_at_ms,
        "finished_at_ms": wire.now_ms() if finished_at_ms is None else finished_at_ms,
    }
    if isinstance(result, BaseException):
        code = result.code if isinstance(result, HotLoraError) else InternalError.code
        message = result.message if isinstance(result, HotLoraError) else f"{type(result).__name__}: {result}"
        return wire.Error(code=code, message=message, **envelope)
    if isinstance(request, wire.CreateAdapter):
        return wire.CreateAdapterResult(adapter=_info_to_wire(result), **envelope)
    if isinstance(request, wire.DeleteAdapter):
        return wire.DeleteAdapterResult(**envelope)
    if isinstance(request, wire.ListAdapters):
        return wire.ListAdaptersResult(adapters=[_info_to_wire(info) for info in result], **envelope)
    if isinstance(request, wire.Sample):
        sequences = [
            wire.SampledSequence(
                tokens=pack_i32(s.tokens),
                logprobs=pack_f32(s.logprobs),
                stop_reason=s.stop_reason,
                adapter_version=s.adapter_version,
            )
            for s in result.sequences
        ]
        return wire.SampleResult(sequences=sequences, adapter_version=result.adapter_version, **envelope)
    if isinstance(request, wire.ForwardBackward):
        return wire.ForwardBackwardResult(
            losses=[float(x) for x in result.losses],
            logprobs=[pack_f32(_flat(t)) for t in result.logprobs],
            num_tokens=int(result.num_tokens),
            **envelope,
        )
    if isinstance(request, wire.OptimStep):
        return wire.OptimStepResult(
            version=result.version,
            grad_norm=float(result.grad_norm),
            weight_sync_s=result.weight_sync_s,
            **envelope,
        )
    if isinstance(request, wire.SaveState):
        return wire.SaveStateResult(path=str(result.path), version=result.version, **envelope)
    if isinstance(request, wire.LoadState):
        return wire.LoadStateResult(adapter=_info_to_wire(result), **envelope)
    raise InvalidRequest(f"{type(request).__name__} is not a request")


def result_to_engine(message: wire.ResultMessage) -> Any:
    """The engine-typed value a result carries, as ``Engine.submit`` would return it.

    An ``error`` is raised as its typed exception, so an agent's ``await client.sample(...)`` fails the
    same way ``await engine.sample(...)`` does in process.
    """
    if isinstance(message, wire.Error):
        raise error_to_exception(message)
    if isinstance(message, wire.CreateAdapterResult | wire.LoadStateResult):
        return _info_to_engine(message.adapter)
    if isinstance(message, wire.DeleteAdapterResult):
        return None
    if isinstance(message, wire.ListAdaptersResult):
        return [_info_to_engine(info) for info in message.adapters]
    if isinstance(message, wire.SampleResult):
        sequences = [
            EngineSampledSequence(
                tokens=unpack_i32(s.tokens).tolist(),
                logprobs=unpack_f32(s.logprobs).tolist(),
                stop_reason=s.stop_reason,
                adapter_version=s.adapter_version,
            )
            for s in message.sequences
        ]
        return eng.SampleOutput(sequences, message.adapter_version)
    if isinstance(message, wire.ForwardBackwardResult):
        logprobs = [_floats(data) for data in message.logprobs]
        return ForwardBackwardOutput(message.adapter_id, list(message.losses), logprobs, message.num_tokens)
    if isinstance(message, wire.OptimStepResult):
        return OptimStepOutput(message.adapter_id, message.version, message.grad_norm, message.weight_sync_s)
    if isinstance(message, wire.SaveStateResult):
        return eng.SaveOutput(message.path, message.version)
    raise InvalidRequest(f"{type(message).__name__} is not a result")


def error_to_exception(message: wire.Error) -> HotLoraError:
    """The typed exception for an ``error``; an unknown code (a newer engine) keeps its code string."""
    cls = ERROR_CODES.get(message.code)
    if cls is None:
        err = HotLoraError(message.message)
        err.code = message.code
        return err
    return cls(message.message)


def _info_to_wire(info: EngineAdapterInfo) -> wire.AdapterInfo:
    return wire.AdapterInfo(
        adapter_id=info.adapter_id,
        slot=info.slot,
        resident=info.resident,
        rank=info.rank,
        alpha=float(info.alpha),
        targets=list(info.targets),
        version=info.version,
        num_parameters=info.num_parameters,
        seq=info.seq,
    )


def _info_to_engine(info: wire.AdapterInfo) -> EngineAdapterInfo:
    return EngineAdapterInfo(
        adapter_id=info.adapter_id,
        slot=info.slot,
        resident=info.resident,
        rank=info.rank,
        alpha=info.alpha,
        targets=tuple(info.targets),
        version=info.version,
        num_parameters=info.num_parameters,
        seq=info.seq,
    )


__all__ = ["ERROR_CODES", "error_to_exception", "from_engine", "result_to_engine", "to_engine", "to_wire"]
