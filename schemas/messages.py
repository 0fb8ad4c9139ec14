"""Every hotlora wire message as a msgspec Struct: one tagged union, discriminated by ``type``.

The envelope (``Message``) is shared by all messages so an edge can route, order, correlate and time
any message without knowing its verb. Fields are encoded as a MessagePack map with the tag first,
then the envelope, then the verb's fields; ``docs/protocol.md`` is the language-neutral spec.

Per-token arrays are packed bytes (``I32Array``/``F32Array``); per-datum or per-request scalars are
plain MessagePack numbers. Semantic checks (a positive rank, a known loss) stay in the engine's own
types, so the rules live in one place; the wire only checks shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import msgspec

from hotlora.schemas.arrays import F32Array, I32Array

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({SCHEMA_VERSION})

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


def new_request_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_arrays(struct: msgspec.Struct, itemsizes: dict[str, int]) -> None:
    """Raise ``ValueError`` (msgspec turns it into a ValidationError with the field's path)."""
    for name, itemsize in itemsizes.items():
        value = getattr(struct, name)
        for data in value if isinstance(value, list) else [value]:
            if data is not None and len(data) % itemsize:
                raise ValueError(f"packed array `{name}` has {len(data)} bytes, not a multiple of {itemsize}")


class Message(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    """The envelope. On the wire every envelope field is required, even though Python fills defaults.

    ``adapter_id`` is "" where no adapter applies (list_adapters, heartbeat, sampling the plain base);
    ``seq`` is the agent's per-adapter sequence number (0 = unordered).
    """

    v: NonNegative = SCHEMA_VERSION
    request_id: str = msgspec.field(default_factory=new_request_id)
    adapter_id: str = ""
    seq: NonNegative = 0
    reply_to: str = ""
    sent_at_ms: NonNegative = msgspec.field(default_factory=now_ms)


# ----- requests (agent -> engine) -----


class Request(Message, kw_only=True, frozen=True):
    """Base of the eight verbs; the engine answers each with ``<verb>_result`` or ``error``.

    ``principal`` names the tenant and ``token`` is its agent's secret: an adapter created with a
    principal is refused (``forbidden``) to any other principal or token. Both "" = unowned (optional
    on the wire, unlike the envelope's other fields; results never echo them).
    """

    principal: str = ""
    token: str = ""


class CreateAdapter(Request, tag="create_adapter", kw_only=True, frozen=True):
    """A new LoRA adapter; ``targets`` is a preset name or a list of module-name suffixes."""

    rank: Positive = 16
    alpha: float = 32.0
    targets: str | list[str] = "all-linear"
    seed: int = 0
    weight: float = 1.0  # the adapter's share of tokens in the scheduler's fair queue


class DeleteAdapter(Request, tag="delete_adapter", kw_only=True, frozen=True):
    pass


class ListAdapters(Request, tag="list_adapters", kw_only=True, frozen=True):
    pass


class Sample(Request, tag="sample", kw_only=True, frozen=True):
    """``n`` completions of one prompt; ``adapter_id=""`` samples the plain base model."""

    prompt_tokens: I32Array
    n: Positive = 1
    max_tokens: Positive = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: NonNegative = 0
    stop: list[str | int] = msgspec.field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_arrays(self, {"prompt_tokens": 4})


class Datum(msgspec.Struct, kw_only=True, frozen=True):
    """One training sequence: ``input_tokens[t]`` predicts ``target_tokens[t]`` with ``weights[t]``.

    ``weights=None`` means all ones; RL losses also read ``logprobs`` and ``advantages`` per token; the
    clipped losses optional per-token ``clip_low_threshold`` / ``clip_high_threshold``, gspo its
    ``sequence_ratio_mask`` (see ``engine.losses``).
    """

    input_tokens: I32Array
    target_tokens: I32Array
    weights: F32Array | None = None
    logprobs: F32Array | None = None
    advantages: F32Array | None = None
    clip_low_threshold: F32Array | None = None
    clip_high_threshold: F32Array | None = None
    sequence_ratio_mask: F32Array | None = None

    def __post_init__(self) -> None:
        _check_arrays(
            self,
            {
                "input_tokens": 4,
                "target_tokens": 4,
                "weights": 4,
                "logprobs": 4,
                "advantages": 4,
                "clip_low_threshold": 4,
                "clip_high_threshold": 4,
                "sequence_ratio_mask": 4,
            },
        )


class ForwardBackward(Request, tag="forward_backward", kw_only=True, frozen=True):
    """Gradients accumulate in the adapter until its next ``optim_step``; ``forward_only`` (Tinker's
    ``forward``) computes the same losses and logprobs and leaves the gradients alone."""

    datums: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] = msgspec.field(default_factory=dict)
    forward_only: bool = False


class OptimStep(Request, tag="optim_step", kw_only=True, frozen=True):
    """One AdamW step; the defaults are the Tinker SDK's (``grad_clip_norm`` 0.0: no clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class SaveState(Request, tag="save_state", kw_only=True, frozen=True):
    """``include_optimizer=False`` is ``save_weights_for_sampler``: PEFT weights only."""

    path: str
    include_optimizer: bool = True


class LoadState(Request, tag="load_state", kw_only=True, frozen=True):
    """Creates or replaces ``adapter_id`` from a checkpoint directory."""

    path: str


# ----- results (engine -> agent's reply_to) -----


class Result(Message, kw_only=True, frozen=True):
    """Echoes the request's envelope; adds when the engine received and finished it."""

    received_at_ms: NonNegative = 0
    finished_at_ms: NonNegative = 0


class AdapterInfo(msgspec.Struct, kw_only=True, frozen=True):
    """An adapter as the engine sees it; ``slot=None`` while offloaded from the device."""

    adapter_id: str
    slot: int | None
    resident: bool
    rank: int
    alpha: float
    targets: list[str]
    version: NonNegative
    num_parameters: NonNegative
    seq: NonNegative = 0  # the last seq the engine accepted for it: a restarted agent continues after it


class CreateAdapterResult(Result, tag="create_adapter_result", kw_only=True, frozen=True):
    adapter: AdapterInfo


class DeleteAdapterResult(Result, tag="delete_adapter_result", kw_only=True, frozen=True):
    pass


class ListAdaptersResult(Result, tag="list_adapters_result", kw_only=True, frozen=True):
    adapters: list[AdapterInfo]


class SampledSequence(msgspec.Struct, kw_only=True, frozen=True):
    """Generated tokens (including the stop token that ended it) and their raw logprobs."""

    tokens: I32Array
    logprobs: F32Array
    stop_reason: str  # "stop" | "length"
    adapter_version: NonNegative

    def __post_init__(self) -> None:
        _check_arrays(self, {"tokens": 4, "logprobs": 4})


class SampleResult(Result, tag="sample_result", kw_only=True, frozen=True):
    sequences: list[SampledSequence]
    adapter_version: NonNegative


class ForwardBackwardResult(Result, tag="forward_backward_result", kw_only=True, frozen=True):
    """Per-datum ``losses`` and per-datum packed target ``logprobs``, in the request's datum order."""

    losses: list[float]
    logprobs: list[F32Array]
    num_tokens: NonNegative

    def __post_init__(self) -> None:
        _check_arrays(self, {"logprobs": 4})


class OptimStepResult(Result, tag="optim_step_result", kw_only=True, frozen=True):
    """``weight_sync_s``: seconds to export and load the new weights into the vLLM sampler (nil: native)."""

    version: NonNegative
    grad_norm: float
    weight_sync_s: float | None = None


class SaveStateResult(Result, tag="save_state_result", kw_only=True, frozen=True):
    path: str
    version: NonNegative


class LoadStateResult(Result, tag="load_state_result", kw_only=True, frozen=True):
    adapter: AdapterInfo


class Error(Result, tag="error", kw_only=True, frozen=True):
    """A failed request: ``code`` is a stable name (``docs/protocol.md`` lists them)."""

    code: str
    message: str


# ----- events (engine -> topic) -----


class Event(Message, kw_only=True, frozen=True):
    """Published by the engine on its own; ``request_id`` is a fresh id unless a request caused it."""


class CheckpointEvent(Event, tag="checkpoint", kw_only=True, frozen=True):
    """A checkpoint the engine wrote: ``step`` is the adapter version, ``sha256`` the directory digest.

    The digest is ``engine.digest.directory_sha256``, so a reader can verify the whole directory.
    """

    path: str
    step: NonNegative
    sha256: str
    include_optimizer: bool = False


class AdapterLoad(msgspec.Struct, kw_only=True, frozen=True):
    """One adapter's load on the engine that sent the heartbeat (``hotlora top`` reads it).

    ``queued``: its requests waiting in the engine's scheduler; ``running``: dispatched, not finished.
    ``sampled_tokens`` / ``trained_tokens`` are cumulative since the engine started (generated tokens
    of ``sample`` results; ``input_tokens`` of ``forward_backward`` datums); ``tokens_per_s`` is both
    together since the previous heartbeat. ``version`` is the trainer's version (its optimizer steps);
    ``version_lag`` is ``docs/protocol.md``'s off-policy lag (0 = on-policy). ``rows`` / ``paused_rows``:
    its decode rows running / paused to give other tenants their share (throttling), after the last
    decode slice; ``quota_refusals``: its requests refused with ``quota_exceeded`` since the engine started.
    """

    queued: NonNegative = 0
    running: NonNegative = 0
    sampled_tokens: NonNegative = 0
    trained_tokens: NonNegative = 0
    tokens_per_s: float = 0.0
    version: NonNegative = 0
    version_lag: NonNegative = 0
    optim_steps: NonNegative = 0
    errors: NonNegative = 0
    rows: NonNegative = 0
    paused_rows: NonNegative = 0
    quota_refusals: NonNegative = 0


class Heartbeat(Event, tag="heartbeat", kw_only=True, frozen=True):
    """Liveness plus the cheap load numbers an agent or autoscaler needs."""

    engine_id: str
    steps: NonNegative = 0
    queued_requests: NonNegative = 0
    running_rows: NonNegative = 0
    # Capacity and placement (scale-out, docs/scale-out.md): how many adapters fit on the device at
    # once, how many are there now, and which adapters (and request-topic partitions) this engine owns.
    resident_slots: NonNegative = 0
    resident_adapters: NonNegative = 0
    max_decode_rows: NonNegative = 0
    state: str = "running"
    adapters: list[str] = msgspec.field(default_factory=list)
    partitions: list[int] = msgspec.field(default_factory=list)
    # Per-adapter load (``engine.observability.EngineMetrics.adapter_load``); {} without metrics.
    load: dict[str, AdapterLoad] = msgspec.field(default_factory=dict)
    # The base model's limits, as in ``engine_status``: a client that joins late learns them from any
    # heartbeat instead of searching the metrics topic for the last status event (0 / [] = unknown).
    model_name: str = ""
    vocab_size: NonNegative = 0
    context_length: NonNegative = 0
    eos_token_ids: list[NonNegative] = msgspec.field(default_factory=list)


class EngineStatus(Event, tag="engine_status", kw_only=True, frozen=True):
    """A fuller snapshot: model, limits and every adapter, published at start, stop and on change.

    ``model`` is the base model's directory on the engine's host; ``model_name`` what a client should
    show and compare (a Hub repo id where known). ``vocab_size`` bounds token ids (ids must be below it),
    ``context_length`` bounds a sample's prompt + ``max_tokens`` and a datum's length, ``eos_token_ids``
    end every sample. ``checkpoint_dir`` is the absolute directory that relative checkpoint paths are
    taken from (results and ``checkpoint`` events carry absolute paths under it). 0 / "" / [] = unknown
    (an engine older than these fields).
    """

    engine_id: str
    model: str
    state: str  # "starting" | "running" | "draining" | "stopped"
    max_adapters: NonNegative = 0
    max_decode_rows: NonNegative = 0
    sampler: str = "native"  # the rollout backend: "native" | "vllm"
    adapters: list[AdapterInfo] = msgspec.field(default_factory=list)
    model_name: str = ""
    vocab_size: NonNegative = 0
    context_length: NonNegative = 0
    eos_token_ids: list[NonNegative] = msgspec.field(default_factory=list)
    checkpoint_dir: str = ""


class Metrics(Event, tag="metrics", kw_only=True, frozen=True):
    """An agent's progress, published by the agent (not the engine) on the metrics topic.

    One per training step; ``step`` 0 and eval steps carry ``eval_reward`` (mean reward of sampled
    completions at the training temperature on the held-out set of the current ``task``), ``accuracy``
    (greedy exact match on the same set), and both per task seen so far (forgetting, in continual runs).
    ``logprob_mismatch`` is the mean |sampler logprob - trainer logprob| over the step's generated tokens.
    ``weight_sync_s`` is the step's ``optim_step`` weight sync to the sampler (nil for the native sampler).
    """

    experiment: str
    task: str
    step: NonNegative
    reward_mean: float | None = None
    eval_reward: float | None = None
    eval_reward_by_task: dict[str, float] = msgspec.field(default_factory=dict)
    accuracy: float | None = None
    accuracy_by_task: dict[str, float] = msgspec.field(default_factory=dict)
    step_seconds: float = 0.0
    logprob_mismatch: float | None = None
    weight_sync_s: float | None = None
    loss: float | None = None
    groups: NonNegative = 0
    skipped_groups: NonNegative = 0
    version: NonNegative = 0
    checkpoint: str | None = None  # a continual run's state saved at the end of a phase


RequestMessage = (
    CreateAdapter | DeleteAdapter | ListAdapters | Sample | ForwardBackward | OptimStep | SaveState | LoadState
)
ResultMessage = (
    CreateAdapterResult
    | DeleteAdapterResult
    | ListAdaptersResult
    | SampleResult
    | ForwardBackwardResult
    | OptimStepResult
    | SaveStateResult
    | LoadStateResult
    | Error
)
EventMessage = CheckpointEvent | Heartbeat | EngineStatus | Metrics
AnyMessage = RequestMessage | ResultMessage | EventMessage

REQUEST_TYPES: tuple[type[Request], ...] = RequestMessage.__args__  # type: ignore[attr-defined]
RESULT_TYPES: tuple[type[Result], ...] = ResultMessage.__args__  # type: ignore[attr-defined]
EVENT_TYPES: tuple[type[Event], ...] = EventMessage.__args__  # type: ignore[attr-defined]
MESSAGE_TYPES: tuple[type[Message], ...] = REQUEST_TYPES + RESULT_TYPES + EVENT_TYPES

# Each request's success result, so the engine edge and the SDK agree on what answers what.
RESULT_FOR: dict[type[Request], type[Result]] = {
    CreateAdapter: CreateAdapterResult,
    DeleteAdapter: DeleteAdapterResult,
    ListAdapters: ListAdaptersResult,
    Sample: SampleResult,
    ForwardBackward: ForwardBackwardResult,
    OptimStep: OptimStepResult,
    SaveState: SaveStateResult,
    LoadState: LoadStateResult,
}


def tag_of(cls: type[Message]) -> str:
    """The ``type`` string a message class is sent as."""
    return str(cls.__struct_config__.tag)
