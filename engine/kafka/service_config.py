"""``ServiceConfig``: the engine service's knobs, filled from CLI flags and environment variables in one place.

12-factor: every flag has a ``HOTLORA_<NAME>`` variable, so compose can configure the engine without a
command line. A flag given on the command line wins over the variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from hotlora.engine.kafka.quotas import QuotaLimits

if TYPE_CHECKING:
    from hotlora.engine.kafka.security import KafkaSecurity


@dataclass
class ServiceConfig:
    """``bootstrap=None`` starts an embedded broker; ``model=None``: ``hotlora engine`` uses the cached tiny model."""

    bootstrap: str | None = None
    model: str | None = None
    model_name: str | None = None  # what heartbeats and engine_status call the base; None: from the path
    topic_prefix: str = "hotlora"
    partitions: int = 4
    replication_factor: int = 1
    checkpoint_dir: str = "checkpoints"
    group_id: str | None = None  # default: "<topic_prefix>.engine"
    dtype: str = "auto"
    device: str = "auto"
    device_lock_dir: str = "/tmp/hotlora-device-locks"  # --device cuda:claim: one host's GPU locks
    heartbeat_interval: float = 5.0  # seconds between heartbeat events
    metrics_port: int | None = None  # Prometheus /metrics (engine.observability); 0: a free port; None: off
    max_decode_rows: int = 256
    max_resident_rows: int = 0  # native sampler: rows admitted at once, running or paused; 0: 2 x max_decode_rows
    # Per-principal quotas (engine.kafka.quotas, whose defaults these are); 0 switches one off.
    quota_adapters: int = QuotaLimits.adapters_per_principal
    quota_queued_per_adapter: int = QuotaLimits.queued_per_adapter
    quota_queued: int = QuotaLimits.queued_per_principal
    quota_queued_bytes: int = QuotaLimits.queued_bytes_per_principal
    quota_sample_rows: int = QuotaLimits.sample_rows_per_principal
    quota_forward_backward_tokens: int = QuotaLimits.forward_backward_tokens
    resident_slots: int | None = None
    # CUDA without resident_slots: the share of device memory left free by the loaded model that
    # resident adapters may fill (engine.adapters.slots_for_memory); the rest is for activations.
    resident_memory_fraction: float = 0.25
    max_kv_bytes: int | None = None  # the native sampler's KV-cache bound; None: half the free GPU memory
    token_budget: int = 8192  # padded tokens per training micro-batch
    # Padded tokens per training slice; a forward_backward over it runs as parts (engine.split_calls).
    train_slice_tokens: int = 8192
    gradient_checkpointing: int = 0  # 1: recompute each decoder layer's activations in the backward
    sampler: str = "native"
    vllm_max_loras: int = 8
    vllm_max_lora_rank: int = 64
    vllm_gpu_memory_utilization: float = 0.5
    vllm_kv_cache_bytes: int = 256 << 20
    log_level: str = "info"
    # Kafka transport security (engine.kafka.security); agents read the same HOTLORA_* variables.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Short, for a fast start and a fast failover: Tansu holds a consumer group's JoinGroup for half the
    # session timeout (1 s at least), and a dead engine's adapters move only once its session expires.
    # Apache Kafka refuses sessions under group.min.session.timeout.ms (6000 unless lowered; compose.yaml
    # lowers it): against such a broker pass 6000 or more, and the engine says so if it is refused.
    session_timeout_ms: int = 2_000
    heartbeat_interval_ms: int = 500
    # How long a rebalance waits for every engine to finish, snapshot and release its adapters. An
    # engine that cannot within it stops serving (docs/scale-out.md), so no adapter has two engines.
    rebalance_timeout_ms: int = 60_000
    fetch_max_wait_ms: int = 10  # how long an empty fetch may block; the request hop's floor
    # A held request whose predecessor never arrives (lost, dead-lettered) releases after this long.
    seq_gap_timeout: float = 30.0
    drain_timeout: float = 120.0  # how long shutdown waits for in-flight requests
    result_cache_size: int = 4096  # recent results kept to answer retried request ids
    # A request record larger than this is refused (bad_message + dead letter) before it is decoded.
    max_message_bytes: int = 64 * 1024 * 1024
    # 1: snapshot every adapter after each create/optim_step/load (crash recovery; docs/reliability.md).
    durable: int = 1
    engine_id: str = field(default_factory=lambda: f"engine-{uuid.uuid4().hex[:8]}")

    @property
    def consumer_group(self) -> str:
        return self.group_id or f"{self.topic_prefix}.engine"

    def kafka_security(self) -> KafkaSecurity:
        """The validated TLS/SASL settings; raises ``ValueError`` for a bad combination."""
        from hotlora.engine.kafka.security import KafkaSecurity

        return KafkaSecurity.from_settings(self)


# (field, flag help). The variable is HOTLORA_<FIELD in upper case>.
_FLAGS: dict[str, str] = {
    "bootstrap": "Kafka bootstrap HOST:PORT (default: start an embedded broker)",
    "model": "base model directory (default: the cached tiny model)",
    "model_name": "the base model's name in heartbeats and engine_status, e.g. Qwen/Qwen3-8B (default: the Hub "
    "repo id of a Hugging Face cache path, else the directory's name)",
    "topic_prefix": "topic name prefix (default hotlora)",
    "partitions": "partitions per topic created at start (default 4)",
    "replication_factor": "replication factor of created topics (default 1)",
    "checkpoint_dir": "where relative checkpoint paths and shutdown checkpoints go (default ./checkpoints)",
    "group_id": "consumer group (default <prefix>.engine)",
    "dtype": "model dtype: auto, float32, bfloat16, float16 (default auto)",
    "device": "model device: auto, cpu, cuda, cuda:N, or cuda:claim (take a GPU no other engine holds) (default auto)",
    "device_lock_dir": "cuda:claim GPU locks, shared by one host's engines (default /tmp/hotlora-device-locks)",
    "heartbeat_interval": "seconds between heartbeat events (default 5)",
    "metrics_port": "serve Prometheus metrics at http://0.0.0.0:PORT/metrics; 0 picks a free port (default: off)",
    "max_decode_rows": "rows in the running decode batch, shared fairly among tenants (default 256)",
    "max_resident_rows": "native sampler: rows admitted at once, decoding or paused for fairness, each holding its "
    "KV cache; one adapter holds at most --max-decode-rows of them (default 0: 2 x --max-decode-rows)",
    "quota_adapters": "adapters one principal may own; 0: no quota (default 64, of the engine's 256)",
    "quota_queued_per_adapter": "requests of one adapter accepted and not yet answered; 0: no quota (default 256)",
    "quota_queued": "requests of one principal accepted and not yet answered; 0: no quota (default 1024)",
    "quota_queued_bytes": "wire bytes of one principal's accepted, unanswered requests; 0: no quota "
    "(default 268435456)",
    "quota_sample_rows": "sample rows (n) of one principal's accepted, unanswered samples; 0: no quota (default 4096)",
    "quota_forward_backward_tokens": "padded tokens (datums x longest) of one forward_backward; 0: no quota "
    "(default 1048576)",
    "resident_slots": "adapters resident on the device at once (default: all on CPU; on CUDA, as many as fit "
    "--resident-memory-fraction)",
    "resident_memory_fraction": "CUDA without --resident-slots: share of the memory free after the model loads "
    "that resident adapters (weights, gradients, AdamW moments) may fill (default 0.25)",
    "max_kv_bytes": "native sampler: KV-cache bound in bytes; requests wait until their rows fit (default: half the "
    "GPU memory free at start; no bound on CPU)",
    "token_budget": "padded tokens per training micro-batch (default 8192)",
    "train_slice_tokens": "padded tokens per training slice; a larger forward_backward runs as parts, with other "
    "tenants' sampling and training between them (default 8192)",
    "gradient_checkpointing": "1: recompute each decoder layer's activations in the backward, for less memory "
    "(default 0)",
    "sampler": "rollout backend: native, vllm, or auto (vllm when it imports) (default native)",
    "vllm_max_loras": "vLLM: adapters in one batch (default 8)",
    "vllm_max_lora_rank": "vLLM: largest LoRA rank, one of 1 8 16 32 64 128 256 320 512 (default 64)",
    "vllm_gpu_memory_utilization": "vLLM on a GPU: its share of device memory; training gets the rest (default 0.5)",
    "vllm_kv_cache_bytes": "vLLM on CPU: KV cache size in bytes (default 268435456)",
    "log_level": "debug, info, warning, error (default info)",
    "security_protocol": "Kafka security: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (default PLAINTEXT)",
    "sasl_mechanism": "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (default PLAIN)",
    "sasl_username": "SASL user name (required by the SASL protocols)",
    "sasl_password": "SASL password (required by the SASL protocols; prefer the variable to the flag)",
    "ssl_cafile": "CA bundle that verifies the brokers' TLS certificates (default: the system's CAs)",
    "ssl_certfile": "client certificate (PEM) for mutual TLS",
    "ssl_keyfile": "client private key (PEM) for mutual TLS",
    "session_timeout_ms": "consumer group session timeout; Apache Kafka accepts 6000 and up unless its "
    "group.min.session.timeout.ms is lowered (default 2000)",
    "heartbeat_interval_ms": "consumer group heartbeat interval (default 500)",
    "rebalance_timeout_ms": "how long a rebalance waits for an engine to release its adapters (default 60000)",
    "fetch_max_wait_ms": "longest wait of an empty fetch, the floor of a request's hop (default 10)",
    "seq_gap_timeout": "seconds a request waits for a missing predecessor seq (default 30)",
    "drain_timeout": "seconds shutdown waits for in-flight requests (default 120)",
    "max_message_bytes": "largest request record accepted; larger ones get bad_message (default 67108864)",
    "durable": "1: snapshot adapter state after every optim_step for crash recovery; 0: off (default 1)",
    "engine_id": "id in heartbeats and status events (default random)",
}


def env_name(name: str) -> str:
    return f"HOTLORA_{name.upper()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field; defaults stay None so ``from_sources`` can tell them apart."""
    for name, text in _FLAGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=f"{text} [env {env_name(name)}]"
        )


def _converter(name: str) -> Callable[[str], Any]:
    kind = {f.name: f.type for f in fields(ServiceConfig)}[name]
    if "int" in str(kind):
        return int
    if "float" in str(kind):
        return float
    return str


def from_sources(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> ServiceConfig:
    """Flags over environment over defaults; a malformed value fails with the name of its source."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name in _FLAGS:
        raw = getattr(args, name, None) if args is not None else None
        source = f"--{name.replace('_', '-')}"
        if raw is None and env.get(env_name(name)):
            raw, source = env[env_name(name)], env_name(name)
        if raw is None:
            continue
        try:
            values[name] = _converter(name)(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not a valid {name}") from None
    config = ServiceConfig(**values)
    config.kafka_security()  # an unknown protocol or SASL without credentials fails here, at startup
    return config
