"""The Tinker API's vocabulary on the gateway's side: ids and paths, request bodies, loss settings, results.

Nothing here does I/O. The server (``hotlora.gateway.server``) turns a Tinker request into these plain
values, then into ``HotLoraClient`` calls, and renders the results back in the shapes the SDK parses.

**Ids are derived, not stored**, so any gateway in front of the same engines can serve any request:

- a session is ``s<12 hex>``; its ``n``-th training client is the model ``<session>:train:<n>`` (the
  id the SDK itself derives for ``create_training_client_from_state``), which is the adapter
  ``<session>.train.<n>`` on the engine (adapter ids allow no ``:``);
- a checkpoint ``tinker://<model>/<weights|sampler_weights>/<name>`` lives at
  ``tinker/<principal>/<adapter>/<kind>/<name>`` under the engine's ``checkpoint_dir``. The principal is
  the caller's, never taken from the path, so one API key can neither read nor load another key's
  checkpoints even if it knows their Tinker paths;
- a sampler checkpoint is sampled through a frozen copy, the adapter ``<adapter>.sw-<hash>``, the hash
  over the caller's principal and the checkpoint's name;
- a sampling session id carries what it samples (``base`` or a Tinker path, base64url-encoded).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hotlora.engine.losses import validate_loss_config
from hotlora.gateway import proto
from hotlora.schemas.errors import HotLoraError

# ----- errors -----

USER, SERVER, UNKNOWN = "user", "server", "unknown"  # Tinker's RequestErrorCategory values

# hotlora error codes (engine.errors, schemas.errors, ownership, the client) -> Tinker's category.
SERVER_CODES = frozenset({"internal", "rollout_failed", "timeout", "client_closed", "capacity_exceeded"})


class TinkerError(Exception):
    """A request the gateway refuses: ``status`` for an HTTP answer, ``category`` for a failed future."""

    def __init__(self, message: str, status: int = 400, category: str = USER) -> None:
        super().__init__(message)
        self.message, self.status, self.category = message, status, category


def unsupported(what: str) -> TinkerError:
    return TinkerError(f"{what} is not supported by the hotlora gateway (see docs/tinker.md)", status=400)


def category_of(code: str) -> str:
    return SERVER if code in SERVER_CODES else USER


# ----- ids and paths -----

SESSION_RE = re.compile(r"^s[0-9a-f]{12}$")
MODEL_RE = re.compile(r"^(s[0-9a-f]{12}):train:(\d{1,9})$")
ADAPTER_RE = re.compile(r"^(s[0-9a-f]{12})\.train\.(\d{1,9})$")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
KINDS = ("weights", "sampler_weights")
EPHEMERAL = "ephemeral-"  # save_weights_and_get_sampling_client's checkpoints; not listed


def new_session_id() -> str:
    return f"s{secrets.token_hex(6)}"


def check_session(session_id: str) -> str:
    if not isinstance(session_id, str) or not SESSION_RE.match(session_id):
        raise TinkerError(f"unknown session id {str(session_id)[:80]!r}", status=404)
    return session_id


def model_id_of(session_id: str, model_seq_id: int) -> str:
    check_session(session_id)
    if not isinstance(model_seq_id, int) or isinstance(model_seq_id, bool) or not 0 <= model_seq_id < 10**9:
        raise TinkerError(f"model_seq_id must be an integer in [0, 1e9), got {model_seq_id!r}")
    return f"{session_id}:train:{model_seq_id}"


def adapter_of(model_id: str) -> str:
    """The engine adapter of a Tinker model id; unknown shapes are unknown models (404)."""
    match = MODEL_RE.match(model_id) if isinstance(model_id, str) else None
    if match is None:
        raise TinkerError(f"model {str(model_id)[:80]!r} not found", status=404)
    return f"{match.group(1)}.train.{match.group(2)}"


def model_of(adapter_id: str) -> str | None:
    """The Tinker model id of a gateway-made training adapter, else None (frozen copies, agents' adapters)."""
    match = ADAPTER_RE.match(adapter_id)
    return f"{match.group(1)}:train:{match.group(2)}" if match else None


def session_of(model_id: str) -> str:
    return adapter_of(model_id).split(".", 1)[0]


def principal_dir(principal: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", principal)[:100] or "_anonymous"


@dataclass(frozen=True)
class Checkpoint:
    """A Tinker checkpoint: ``tinker://<model_id>/<kind>/<name>``."""

    model_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    @classmethod
    def parse(cls, path: str) -> Checkpoint:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise TinkerError(f"checkpoint path {str(path)[:200]!r} must look like tinker://<model_id>/weights/<name>")
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise TinkerError(
                f"checkpoint path {path[:200]!r} must look like tinker://<model_id>/(weights|sampler_weights)/<name>"
            )
        adapter_of(parts[0])
        return cls(parts[0], parts[1], check_name(parts[2]))

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"

    @property
    def adapter_id(self) -> str:
        return adapter_of(self.model_id)

    def storage_path(self, principal: str) -> str:
        """Where the engine keeps it, relative to its checkpoint_dir: under the caller's principal."""
        return f"tinker/{principal_dir(principal)}/{self.adapter_id}/{self.kind}/{self.name}"

    def frozen_adapter(self, principal: str) -> str:
        """The adapter that serves samples of this sampler checkpoint, distinct per caller."""
        digest = hashlib.sha256(f"{principal}\0{self.model_id}\0{self.name}".encode()).hexdigest()[:16]
        return f"{self.adapter_id}.sw-{digest}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


def missing(checkpoint: Checkpoint) -> TinkerError:
    """What a caller hears about a checkpoint the engine cannot read under its principal: never the storage path."""
    return TinkerError(f"checkpoint {checkpoint.tinker_path} not found", status=404)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TinkerError(
            f"checkpoint name {str(name)[:80]!r} must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'"
        )
    return name


def checkpoint_from_storage(path: str) -> tuple[str, Checkpoint] | None:
    """``(principal_dir, checkpoint)`` for an engine path ``.../tinker/<p>/<adapter>/<kind>/<name>``."""
    parts = path.rstrip("/").split("/")
    if len(parts) < 5 or parts[-5] != "tinker" or parts[-2] not in KINDS:
        return None
    model_id = model_of(parts[-3])
    if model_id is None or not NAME_RE.match(parts[-1]):
        return None
    return parts[-4], Checkpoint(model_id, parts[-2], parts[-1])


def sampling_session_id(session_id: str, seq: int, target: str | None) -> str:
    """``target`` None samples the base model, else a sampler checkpoint's Tinker path."""
    encoded = base64.urlsafe_b64encode((target or "base").encode()).decode().rstrip("=")
    return f"{session_id}:sample:{seq}:{encoded}"


def sampling_target(sampling_id: str) -> Checkpoint | None:
    """The checkpoint a sampling session samples (None: the base model)."""
    parts = sampling_id.split(":") if isinstance(sampling_id, str) else []
    if len(parts) != 4 or parts[1] != "sample" or not SESSION_RE.match(parts[0]):
        raise TinkerError(f"sampling session {str(sampling_id)[:80]!r} not found", status=404)
    try:
        target = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise TinkerError(f"sampling session {sampling_id[:80]!r} not found", status=404) from None
    return None if target == "base" else Checkpoint.parse(target)


# ----- request bodies -----


def field_of(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``body[name]`` checked against ``kind`` (a bool is not an int here); ``default`` when absent."""
    value = body.get(name, default) if isinstance(body, Mapping) else default
    if value is ...:
        raise TinkerError(f"missing field {name!r}")
    if value is None and default is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise TinkerError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _tensor_from_json(name: str, value: Any) -> np.ndarray:
    """A ``TensorData`` JSON object (``data``, ``dtype``, ``shape``) as an array."""
    if isinstance(value, list):  # tolerated: a bare list
        value = {"data": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("data"), list):
        raise TinkerError(f"loss_fn_inputs[{name!r}] must be a TensorData object with a data list")
    if value.get("sparse_crow_indices") is not None:
        raise TinkerError(f"loss_fn_inputs[{name!r}] is sparse (CSR); send dense tensors")
    dtype = value.get("dtype") or ("int64" if name == "target_tokens" else "float32")
    if dtype not in ("int64", "float32"):
        raise TinkerError(f"loss_fn_inputs[{name!r}] has dtype {dtype!r}; use int64 or float32")
    try:
        array = np.asarray(value["data"], dtype=np.int64 if dtype == "int64" else np.float32)
    except (TypeError, ValueError) as err:
        raise TinkerError(f"loss_fn_inputs[{name!r}].data is not numeric: {err}") from None
    shape = value.get("shape")
    if shape is not None:
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise TinkerError(f"loss_fn_inputs[{name!r}].shape must be a list of sizes")
        if math.prod(shape) != array.size:
            raise TinkerError(f"loss_fn_inputs[{name!r}] has {array.size} values for shape {shape}")
        array = array.reshape(shape)
    return array


def tokens_from_json(model_input: Any, what: str = "model_input") -> np.ndarray:
    """The tokens of a ``ModelInput`` JSON object (text chunks only)."""
    chunks = model_input.get("chunks") if isinstance(model_input, Mapping) else None
    if not isinstance(chunks, list):
        raise TinkerError(f"{what} must be a ModelInput object with a chunks list")
    parts: list[list[int]] = []
    for chunk in chunks:
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, Mapping) else None
        if kind != "encoded_text":
            raise unsupported(f"{what} chunks of type {kind!r} (only encoded_text)")
        tokens = chunk.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise TinkerError(f"{what} chunk tokens must be a list of integers")
        parts.append(tokens)
    return np.asarray([t for part in parts for t in part], dtype=np.int64)


@dataclass
class TDatum:
    """One Tinker ``Datum``: input tokens and the loss inputs by name."""

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclass
class FwdBwd:
    """A ``forward_backward`` (or ``forward``) request, from JSON or protobuf."""

    model_id: str
    seq_id: int | None
    data: list[TDatum]
    loss_fn: str
    loss_fn_config: dict[str, Any] = field(default_factory=dict)
    forward_only: bool = False


def fwdbwd_from_json(body: Mapping[str, Any], forward_only: bool) -> FwdBwd:
    key = "forward_input" if "forward_input" in body else "forward_backward_input"
    fb = body.get(key)
    if not isinstance(fb, Mapping):
        raise TinkerError(f"missing field {key!r}")
    data = fb.get("data")
    if not isinstance(data, list):
        raise TinkerError(f"{key}.data must be a list of Datum objects")
    datums = []
    for i, datum in enumerate(data):
        if not isinstance(datum, Mapping) or not isinstance(datum.get("loss_fn_inputs"), Mapping):
            raise TinkerError(f"datum {i} must have model_input and loss_fn_inputs")
        inputs = {name: _tensor_from_json(name, value) for name, value in datum["loss_fn_inputs"].items()}
        datums.append(TDatum(tokens_from_json(datum.get("model_input"), f"datum {i} model_input"), inputs))
    config = fb.get("loss_fn_config") or {}
    if not isinstance(config, Mapping):
        raise TinkerError("loss_fn_config must be an object")
    return FwdBwd(
        model_id=field_of(body, "model_id", str),
        seq_id=field_of(body, "seq_id", int, None),
        data=datums,
        loss_fn=field_of(fb, "loss_fn", str),
        loss_fn_config=dict(config),
        forward_only=forward_only,
    )


def fwdbwd_from_proto(body: bytes) -> FwdBwd:
    try:
        request = proto.read_forward_backward(body)
        datums = [
            TDatum(d.tokens().astype(np.int64), {name: t.array() for name, t in d.loss_fn_inputs.items()})
            for d in request.data
        ]
    except proto.ProtoError as err:
        raise TinkerError(f"bad protobuf ForwardBackwardRequest: {err}") from None
    return FwdBwd(
        request.model_id, request.seq_id, datums, request.loss_fn, request.loss_fn_config, request.forward_only
    )


# ----- losses: Tinker's settings, checked here, computed by the engine (``engine.losses``) -----

RL_LOSSES = ("importance_sampling", "ppo", "cispo", "gspo", "dro")
CLIPPED = ("ppo", "cispo", "gspo")
THRESHOLD_INPUTS = ("clip_low_threshold", "clip_high_threshold")  # per-datum tensors of the clipped losses
LOSS_INPUTS: dict[str, set[str]] = {
    "cross_entropy": {"target_tokens", "weights"},
    **{name: {"target_tokens", "weights", "logprobs", "advantages"} for name in RL_LOSSES},
}
for _name in CLIPPED:
    LOSS_INPUTS[_name] |= set(THRESHOLD_INPUTS)
LOSS_INPUTS["gspo"].add("sequence_ratio_mask")
# Tinker's loss_fn_config keys; the engine's own offsets (clip_epsilon...) are not Tinker's and stay out.
LOSS_CONFIG = {"cross_entropy": set(), "importance_sampling": set(), "dro": {"beta"}} | {
    name: set(THRESHOLD_INPUTS) for name in CLIPPED
}
NOT_YET = {
    "stable_reinforce": (
        "its objective reads stability information that Tinker's sampler records server-side, and Tinker does "
        "not publish that objective; train with importance_sampling, ppo, cispo, gspo or dro"
    ),
    "custom": "server-side custom losses are not implemented; forward_backward_custom runs client-side",
}


def engine_loss_config(loss_fn: str, config: Mapping[str, Any]) -> dict[str, float]:
    """Tinker's ``loss_fn_config`` as the engine's ``loss_config`` (the same keys: the engine takes Tinker's
    absolute thresholds and ``beta``, with Tinker's defaults), or a clear refusal before anything runs."""
    if loss_fn in NOT_YET:
        raise unsupported(f"loss_fn {loss_fn!r} ({NOT_YET[loss_fn]})")
    if loss_fn not in LOSS_CONFIG:
        raise TinkerError(f"unknown loss_fn {loss_fn!r}; use one of {sorted(LOSS_CONFIG)}")
    unknown = set(config) - LOSS_CONFIG[loss_fn]
    if unknown:
        if not LOSS_CONFIG[loss_fn]:
            raise TinkerError(f"loss_fn {loss_fn!r} takes no loss_fn_config, got {sorted(config)}")
        raise TinkerError(
            f"loss_fn_config keys {sorted(unknown)} are not understood by {loss_fn!r} "
            f"(allowed: {sorted(LOSS_CONFIG[loss_fn])})"
        )
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TinkerError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
    engine_config = {key: float(value) for key, value in config.items()}
    try:
        validate_loss_config(loss_fn, engine_config)
    except HotLoraError as err:
        raise TinkerError(err.message) from None
    return engine_config


def check_datum(loss_fn: str, i: int, datum: TDatum) -> None:
    """Refuse, with the reason, what the engine cannot train on (rather than train on something else)."""
    allowed = LOSS_INPUTS.get(loss_fn, set())
    extra = set(datum.inputs) - allowed
    if extra:
        raise TinkerError(
            f"datum {i}: loss_fn_inputs {sorted(extra)} are not used by {loss_fn!r} (allowed: {sorted(allowed)})"
        )
    target = datum.inputs.get("target_tokens")
    if target is None:
        raise TinkerError(f"datum {i}: loss_fn_inputs needs target_tokens")
    n = datum.tokens.size
    if target.ndim == 2 and loss_fn != "cross_entropy":
        raise unsupported(f"datum {i}: top-K targets of shape (N, K) with {loss_fn!r} (cross_entropy only)")
    if target.ndim not in (1, 2) or target.shape[0] != n:
        raise TinkerError(f"datum {i}: target_tokens has shape {list(target.shape)}, model_input has {n} tokens")
    for name, value in datum.inputs.items():
        if name in THRESHOLD_INPUTS and value.size == 1 and value.ndim <= 1:
            continue  # one threshold for the whole datum
        if value.shape != target.shape:
            raise TinkerError(
                f"datum {i}: loss_fn_inputs[{name!r}] has shape {list(value.shape)}, target_tokens {list(target.shape)}"
            )
    if loss_fn in RL_LOSSES and not {"logprobs", "advantages"} <= set(datum.inputs):
        raise TinkerError(f"datum {i}: {loss_fn!r} needs logprobs and advantages in loss_fn_inputs")
    if loss_fn == "gspo" and "sequence_ratio_mask" not in datum.inputs:
        raise TinkerError(f"datum {i}: 'gspo' needs sequence_ratio_mask in loss_fn_inputs (the sampled tokens)")


def per_token(datum: TDatum, name: str) -> np.ndarray | None:
    """A per-token loss input (a datum-wide threshold repeated over its tokens), None if absent."""
    value = datum.inputs.get(name)
    if value is None or (value.ndim == 1 and value.size == datum.tokens.size):
        return value
    return np.full(datum.tokens.size, float(value.reshape(-1)[0]), dtype=np.float32)


def columns(datum: TDatum) -> list[TDatum]:
    """A datum as 1-D datums, one per target column: top-K cross-entropy targets (N, K) are K datums over the
    same input, whose losses and gradients add up to Tinker's  -sum_t sum_k w[t,k] * log p(x[t,k])."""
    target = datum.inputs["target_tokens"]
    if target.ndim == 1:
        return [datum]
    return [
        TDatum(datum.tokens, {name: value[:, k] for name, value in datum.inputs.items()})
        for k in range(target.shape[1])
    ]


# ----- sampling -----


@dataclass
class SampleParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str | int, ...]
    seed: int | None


DEFAULT_MAX_TOKENS = 256  # Tinker leaves max_tokens optional; the engine needs a bound


def sample_params(body: Mapping[str, Any]) -> SampleParams:
    params = body.get("sampling_params")
    if not isinstance(params, Mapping):
        raise TinkerError("missing field 'sampling_params'")
    stop = params.get("stop")
    if stop is None:
        stops: tuple[str | int, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and (
        all(isinstance(s, str) for s in stop) or all(isinstance(s, int) and not isinstance(s, bool) for s in stop)
    ):
        stops = tuple(stop)
    else:
        raise TinkerError("sampling_params.stop must be a string, a list of strings or a list of token ids")
    top_k = field_of(params, "top_k", int, -1)
    seed = field_of(params, "seed", int, None)
    return SampleParams(
        max_tokens=field_of(params, "max_tokens", int, None) or DEFAULT_MAX_TOKENS,
        temperature=float(field_of(params, "temperature", (int, float), 1.0)),
        top_p=float(field_of(params, "top_p", (int, float), 1.0)),
        top_k=0 if top_k < 0 else top_k,  # Tinker's -1 (off) is the engine's 0
        stop=stops,
        # The engine's generator takes a signed 64-bit seed; Tinker's may be any 64-bit value.
        seed=None if seed is None else seed % (2**63),
    )


def prompt_logprobs_request(body: Mapping[str, Any], prompt_len: int) -> int | None:
    """How many trailing prompt tokens to score (``prompt_logprobs``), None for none. Refuses up front what the
    gateway cannot return, instead of silently leaving it out."""
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        if body.get(name):
            raise unsupported(name)
    if body.get("target_prompt_logprobs") is not None:
        raise unsupported("target_prompt_logprobs")
    if body.get("record_stability_info"):
        raise unsupported("record_stability_info (StableReinforce)")
    last_n = field_of(body, "prompt_logprobs_last_n", int, None)
    if not body.get("prompt_logprobs"):
        if last_n is not None:
            raise TinkerError("prompt_logprobs_last_n needs prompt_logprobs")
        return None
    if last_n is None:
        return prompt_len - 1
    if not 1 <= last_n <= prompt_len - 1:
        raise TinkerError(f"prompt_logprobs_last_n must lie in [1, {prompt_len - 1}] for this prompt, got {last_n}")
    return last_n


# ----- results -----


def tensor_json(values: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    return {"data": values.reshape(-1).tolist(), "dtype": dtype, "shape": [int(d) for d in values.shape]}


@dataclass
class FwdBwdResult:
    """Per-datum target logprobs and losses of one forward(_backward)."""

    logprobs: list[np.ndarray]
    losses: list[float]

    @property
    def metrics(self) -> dict[str, float]:
        # loss:sum is the sum of the per-datum losses; the SDK combines chunks by each key's reduction.
        return {"loss:sum": float(sum(self.losses))}

    def json(self) -> dict[str, Any]:
        return {
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": [{"logprobs": tensor_json(lp)} for lp in self.logprobs],
            "metrics": self.metrics,
        }

    def protobuf(self) -> bytes:
        return proto.write_forward_backward_output({"logprobs": self.logprobs}, self.metrics)


@dataclass
class SampleResult:
    sequences: list[proto.OutSequence]
    prompt_logprobs: np.ndarray | None = None  # one per prompt token, NaN where not scored (the first one)

    def json(self) -> dict[str, Any]:
        return {
            "type": "sample",
            "sequences": [
                {
                    "stop_reason": s.stop_reason,
                    "tokens": s.tokens.tolist(),
                    "logprobs": None if s.logprobs is None else s.logprobs.tolist(),
                }
                for s in self.sequences
            ],
            "prompt_logprobs": None
            if self.prompt_logprobs is None
            else [None if math.isnan(x) else float(x) for x in self.prompt_logprobs],
        }

    def protobuf(self) -> bytes:
        return proto.write_sample_response(self.sequences, self.prompt_logprobs)


# Results the SDK may ask for as protobuf (``Accept: application/x-protobuf``).
PROTOBUF_RESULTS = (FwdBwdResult, SampleResult)
