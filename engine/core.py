"""``Engine``: the asyncio facade and the busy loop over the scheduler and the model runner.

Shaped like vLLM v1's ``EngineCore``. Callers ``await engine.submit(request)`` (or a verb of ``engine.verbs``); the
request joins the pure ``Scheduler``; the busy loop asks the scheduler for the next step and runs it on
the model in ONE dedicated worker thread, then reports completions back to the scheduler and resolves
the callers' futures on the event loop.

Two sampler backends. The native one decodes inside the engine's own steps (``DecodeSlice``). The
vLLM one (``EngineConfig.sampler = "vllm"``) runs its own continuous batching in vLLM's engine core:
the busy loop only hands it each admitted sample as an asyncio task, and after every barrier that
changes an adapter's weights it exports them and publishes them to vLLM as a new version before the
barrier completes, so samples submitted after an ``optim_step`` see the new weights.

Why a worker thread rather than yielding between steps: a step is one uninterruptible stretch of torch
work (tens of milliseconds to seconds on a big batch). In the worker, torch releases the GIL inside
its kernels, so the event loop keeps accepting requests, serving heartbeats and moving Kafka messages
while the model computes. Exactly one thread ever touches the model, the adapters and the sampler, so
none of them needs locks; the scheduler is touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.sampler import NativeSampler, validate_sample
from hotlora.engine.scheduler import (
    DecodeSlice,
    Idle,
    RunBarrier,
    Scheduler,
    SchedulerPolicy,
    Step,
    TrainSlice,
    WorkItem,
    WorkKind,
    validate_weight,
)
from hotlora.engine.split_calls import SplitCall, call_tokens
from hotlora.engine.types import (
    AdapterInfo,
    CreateAdapter,
    DeleteAdapter,
    ForwardBackward,
    ListAdapters,
    LoadState,
    OptimStep,
    OptimStepOutput,
    Request,
    Sample,
    SampleOutput,
    SaveOutput,
    SaveState,
)
from hotlora.engine.verbs import Verbs
from hotlora.engine.vllm_sampler import VllmSampler, VllmSettings, resolve_sampler
from hotlora.schemas.errors import EngineClosed, HotLoraError, InternalError, InvalidRequest, RolloutError

if TYPE_CHECKING:
    from hotlora.engine.observability import EngineMetrics

log = structlog.get_logger("hotlora.engine")
T = TypeVar("T")
BASE_ADAPTER = "__base__"  # the scheduler's name for samples of the plain base model


@dataclass
class EngineConfig:
    """Knobs of the engine loop; the runner and scheduler keep their own."""

    max_decode_rows: int = 256  # rows one decode step runs
    # Native sampler: rows admitted at once, running or paused (each holds its KV); None: 2 x max_decode_rows.
    max_resident_rows: int | None = None
    # Rows one adapter's admitted samples may hold; None: max_decode_rows (so a hog leaves resident rows free).
    max_adapter_rows: int | None = None
    # The native sampler's KV-cache bound in bytes; None: half the device memory free at start (CUDA), none on CPU.
    max_kv_bytes: int | None = None
    sampler: str = "native"  # "native" | "vllm" | "auto" (vLLM when it imports)
    vllm: VllmSettings = field(default_factory=VllmSettings)
    scheduler: SchedulerPolicy = field(default_factory=SchedulerPolicy)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


Done = list[tuple[str, Any]]  # (request_id, result or HotLoraError)


class Engine(Verbs):
    """One hot base model, many adapters; see the module docstring for the threading model."""

    def __init__(
        self, runner: ModelRunner, config: EngineConfig | None = None, metrics: EngineMetrics | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.runner = runner
        # Prometheus metrics (engine.observability), fed once per step; None costs nothing.
        self.metrics = metrics
        if metrics is not None:
            runner.micro_batch_hook = metrics.observe_micro_batch
        self.sampler_name = resolve_sampler(self.config.sampler)
        self.sampler: NativeSampler | None = None
        self.rollout: VllmSampler | None = None
        if self.sampler_name == "vllm":
            base = runner.base
            self.rollout = VllmSampler(
                base.path,
                base.dtype,
                base.device,
                self.config.max_decode_rows,
                base.max_positions,
                base.vocab_size,
                self.config.vllm,
            )
        else:
            self.sampler = NativeSampler(
                runner,
                self.config.max_resident_rows or 2 * self.config.max_decode_rows,
                self.config.max_kv_bytes,
                decode_rows=self.config.max_decode_rows,
                weight=lambda adapter_id: self.scheduler.weight(adapter_id or BASE_ADAPTER),
            )
        # Rows the scheduler may admit: the sampler's resident rows (it pauses what exceeds its decode rows).
        self.admission_rows = self.config.max_decode_rows if self.sampler is None else self.sampler.max_rows
        policy = self.config.scheduler
        if policy.max_decode_rows is None:
            policy.max_decode_rows = self.config.max_decode_rows
        if policy.max_adapter_rows is None and self.sampler is not None:
            policy.max_adapter_rows = self.config.max_adapter_rows or self.config.max_decode_rows
        policy.decode_in_background = self.rollout is not None
        self.scheduler = Scheduler(policy)
        self._requests: dict[str, Request] = {}
        self._futures: dict[str, asyncio.Future[Any]] = {}
        # A forward_backward over the training slice's budget runs as parts (engine.split_calls): part id -> call.
        self._splits: dict[str, SplitCall] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlora-model")
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._rollouts: set[asyncio.Task[None]] = set()
        self.steps_run = 0  # steps executed so far (heartbeats and tests read it)
        # Set by ``submit``: a decode slice in progress ends after its current step, so new work (a
        # newcomer's sample, a forward_backward or barrier waiting behind the slice) is scheduled at once.
        self._preempt = threading.Event()
        # Time balance between the kinds while both have work: a decode slice may run past its steps for
        # as long as the last training slice took (less the sampling done since), and a decode slice cut
        # short by a newcomer is followed by another while that time lasts (the newcomer, a sample, is
        # admitted; a forward_backward waits for sampling's time to run out). Without it, a training flood
        # of 0.4 s slices left sampling one 8-step slice (~30 ms) per slice: a 16-token sample took 3
        # training slices. Written by the worker (the decode slice) and the loop, never at once.
        self._train_seconds = 0.0
        self._decode_since_train = 0.0
        self._decode_cut = False
        # (decoding, paused) rows per scheduler adapter id after the last decode slice: written by the
        # worker (one dict assignment), read by metrics and status on the event loop.
        self.tenant_rows: dict[str, tuple[int, int]] = {}
        # (row-steps, row-steps shared with another tenant) per adapter since start, same threading.
        self.row_steps: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
    ) -> Engine:
        config = config or EngineConfig()
        runner = ModelRunner.from_pretrained(path, dtype=dtype, device=device, config=config.runner)
        return cls(runner, config, metrics)

    # ----- lifecycle -----

    async def start(self) -> Engine:
        if self._loop_task is None:
            if self.rollout is not None:
                self.rollout.start()
            self._loop_task = asyncio.create_task(self._busy_loop(), name="hotlora-engine-loop")
        return self

    async def close(self) -> None:
        """Finish the step in progress, fail what is still queued, stop the worker."""
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._rollouts):
            task.cancel()
        if self._rollouts:
            await asyncio.gather(*self._rollouts, return_exceptions=True)
        for request_id, future in list(self._futures.items()):
            if not future.done():
                future.set_exception(EngineClosed(f"engine closed before request {request_id!r} ran"))
        self._futures.clear()
        self._splits.clear()
        self._worker.shutdown(wait=True)
        if self.rollout is not None:
            self.rollout.close()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- submission -----

    async def submit(self, request: Request) -> Any:
        """Queue one request and wait for its result; a typed ``HotLoraError`` is raised for a bad one."""
        if self._closing:
            raise EngineClosed("engine is closing")
        if self._loop_task is None:
            await self.start()
        if isinstance(request, ListAdapters):
            return await self._run_in_worker(self.runner.list_adapters)
        item = self._work_item(request)
        if request.request_id in self._futures:
            raise InvalidRequest(f"request_id {request.request_id!r} is already in flight")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        split = None
        if isinstance(request, ForwardBackward):
            split = SplitCall.of(request, self.scheduler.policy.train_token_budget)
        if split is None:
            self.scheduler.submit(item)  # the last check that may refuse: nothing after it raises
            self._requests[request.request_id] = request
        else:
            self._submit_parts(split)
        if isinstance(request, CreateAdapter):
            self.scheduler.set_weight(request.adapter_id, request.weight)
        self._futures[request.request_id] = future
        self._preempt.set()
        self._wake.set()
        return await future

    def _submit_parts(self, split: SplitCall) -> None:
        """Queue a split call's parts, in order; all or none (a part id already queued refuses the call)."""
        taken = [part.request_id for part in split.parts if part.request_id in self._requests]
        if taken:
            raise InvalidRequest(f"request_id {taken[0]!r} (a part of {split.call.request_id!r}) is already in flight")
        for part in split.parts:
            self.scheduler.submit(self._work_item(part))  # refuses only a queued id, checked above
            self._requests[part.request_id] = part
            self._splits[part.request_id] = split

    def _work_item(self, request: Request) -> WorkItem:
        rid = request.request_id
        if isinstance(request, Sample):
            # Validated before the scheduler sees it: an absurd max_tokens would make an absurd DRR cost.
            base = self.runner.base
            validate_sample(request, base.vocab_size, base.max_positions, self.config.max_decode_rows)
            cost = request.n * (len(request.prompt_tokens) + request.params.max_tokens)
            adapter = request.adapter_id or BASE_ADAPTER
            return WorkItem(rid, adapter, WorkKind.SAMPLE, tokens=max(cost, 1), rows=max(request.n, 1))
        if isinstance(request, ForwardBackward):
            tokens = call_tokens(request.datums)
            return WorkItem(rid, request.adapter_id, WorkKind.FORWARD_BACKWARD, tokens, len(request.datums))
        if isinstance(request, OptimStep):
            return WorkItem(rid, request.adapter_id, WorkKind.OPTIM_STEP, tokens=0)
        if isinstance(request, CreateAdapter):
            validate_weight(request.adapter_id, request.weight)
            if self.rollout is not None:
                self.rollout.check_rank(request.adapter_id, request.spec.rank)
        if isinstance(request, CreateAdapter | DeleteAdapter | SaveState | LoadState):
            return WorkItem(rid, request.adapter_id, WorkKind.CONTROL, tokens=0)
        raise InvalidRequest(f"unknown request type {type(request).__name__}")

    # ----- the busy loop -----

    async def _busy_loop(self) -> None:
        while not self._closing:
            free_rows = max(0, self.admission_rows - self.scheduler.running_rows)
            more_decode = self._decode_cut and self._decode_since_train < self._train_seconds
            step = self.scheduler.next_step(free_rows, continue_decode=more_decode)
            if isinstance(step, Idle):
                self._wake.clear()
                await self._wake.wait()
                continue
            metrics = self.metrics
            if metrics is not None:
                metrics.step_started(step, self._decode_batch(step))
            if isinstance(step, DecodeSlice) and self.rollout is not None:
                for item in step.admit:
                    self._start_rollout(item.request_id)
                continue
            self.steps_run += 1
            self._preempt.clear()  # what is submitted from now on may cut this step's decode slice short
            started = time.perf_counter()
            done = await self._run_in_worker(self._execute, step)
            elapsed = time.perf_counter() - started
            if isinstance(step, TrainSlice):
                self._train_seconds, self._decode_since_train = elapsed, 0.0
            elif isinstance(step, DecodeSlice):
                self._decode_since_train += elapsed
            if metrics is not None:
                metrics.step_finished(step, elapsed, self.runner.adapters)
                metrics.observe_tenants(self.scheduler, self.tenant_rows, self.row_steps)
            if isinstance(step, RunBarrier) and self.rollout is not None:
                await self._sync_rollout(self._requests.get(step.item.request_id), done)
            self._finish(done)

    def _decode_batch(self, step: Step) -> tuple[int, int] | None:
        """(rows, LoRA adapters) of the decode slice about to run, for metrics: the running rows plus
        the admitted ones, which join at its first decode step. None when vLLM does the batching."""
        if not isinstance(step, DecodeSlice) or self.sampler is None:
            return None
        adapters = self.sampler.active_adapters() | {item.adapter_id for item in step.admit}
        adapters.discard(BASE_ADAPTER)
        return self.sampler.num_running_rows() + step.rows, len(adapters)

    # ----- the vLLM backend (event loop) -----

    def _start_rollout(self, request_id: str) -> None:
        task = asyncio.create_task(self._rollout(request_id), name=f"hotlora-rollout-{request_id}")
        self._rollouts.add(task)
        task.add_done_callback(self._rollouts.discard)

    async def _rollout(self, request_id: str) -> None:
        assert self.rollout is not None
        request = self._requests[request_id]
        assert isinstance(request, Sample)
        result: Any
        try:
            result = await self.rollout.generate(request)
        except HotLoraError as err:
            result = err
        except asyncio.CancelledError:
            result = EngineClosed(f"engine closed before request {request_id!r} finished")
        except Exception as err:
            log.exception("rollout_failed", request_id=request_id)
            result = InternalError(f"{type(err).__name__}: {err}")
        self._finish([(request_id, result)])
        self._wake.set()

    async def _sync_rollout(self, request: Request | None, done: Done) -> None:
        """After a barrier changed an adapter's weights: export them and publish a new vLLM version.

        Runs before the barrier completes, so nothing submitted after it samples the old weights. The
        measured export + load time is returned on ``optim_step`` as ``weight_sync_s``.
        """
        assert self.rollout is not None
        rollout = self.rollout
        if isinstance(request, DeleteAdapter):
            await rollout.drop(request.adapter_id)
            return
        if not isinstance(request, OptimStep | CreateAdapter | LoadState):
            return
        index, result = next(((i, r) for i, (rid, r) in enumerate(done) if rid == request.request_id), (-1, None))
        if index < 0 or isinstance(result, HotLoraError):
            return
        started = time.perf_counter()
        adapter = None
        try:
            adapter = await self._run_in_worker(self.runner.adapters.get, request.adapter_id)
            rollout.check_rank(request.adapter_id, adapter.spec.rank)
            new = rollout.allocate(request.adapter_id, adapter.version)
            await self._run_in_worker(self.runner.save_weights, request.adapter_id, new.path)
            await rollout.publish(new)
        except Exception as err:  # the busy loop must survive anything a sync throws
            if isinstance(err, HotLoraError):
                reason = err.message
            else:
                log.exception("weight_sync_failed", adapter_id=request.adapter_id)
                reason = f"{type(err).__name__}: {err}"
            await rollout.fail(request.adapter_id, reason)
            applied = f"{type(request).__name__} applied (version {adapter.version}) but " if adapter else ""
            done[index] = (request.request_id, RolloutError(f"{applied}the weights did not reach vLLM: {reason}"))
            return
        if isinstance(result, OptimStepOutput):
            result.weight_sync_s = time.perf_counter() - started

    async def _run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _finish(self, done: Done) -> None:
        for request_id, result in done:
            self.scheduler.complete(request_id)
            request = self._requests.pop(request_id, None)
            split = self._splits.pop(request_id, None)
            if split is not None:
                if split.record(request_id, result):
                    self._resolve(split.call.request_id, split.result())
                continue
            if isinstance(request, DeleteAdapter) and self.scheduler.pending(request.adapter_id) == 0:
                # Nothing of this adapter is queued (later requests, e.g. a re-create, keep their
                # state and fail or succeed on their own); forget its scheduler state.
                self.scheduler.remove_adapter(request.adapter_id)
            self._resolve(request_id, result)

    def _resolve(self, request_id: str, result: Any) -> None:
        future = self._futures.pop(request_id, None)
        if future is None or future.done():
            return
        if isinstance(result, HotLoraError):
            future.set_exception(result)
        else:
            future.set_result(result)

    # ----- step execution (worker thread only) -----

    def _execute(self, step: Step) -> Done:
        done: Done = []
        try:
            if isinstance(step, RunBarrier):
                done.append((step.item.request_id, self._run_barrier(self._requests[step.item.request_id])))
            elif isinstance(step, TrainSlice):
                self._run_train(step, done)
            elif isinstance(step, DecodeSlice):
                self._run_decode(step, done)
        except Exception as err:  # a bug or OOM must fail this step's requests, not kill the engine
            log.exception("step_failed", step=type(step).__name__)
            finished = {request_id for request_id, _ in done}
            error = InternalError(f"{type(err).__name__}: {err}")
            done.extend((rid, error) for rid in self._step_request_ids(step) if rid not in finished)
        return done

    def _step_request_ids(self, step: Step) -> list[str]:
        if isinstance(step, RunBarrier):
            return [step.item.request_id]
        if isinstance(step, TrainSlice):
            return [item.request_id for item in step.items]
        if isinstance(step, DecodeSlice):
            assert self.sampler is not None
            running = self.sampler.abort_all()
            return sorted(set(running) | {item.request_id for item in step.admit})
        return []

    def _run_barrier(self, request: Request) -> Any:
        try:
            if isinstance(request, OptimStep):
                out = self.runner.optim_step(request.adapter_id, request.params)
                if request.capture_state:
                    out.state = self.runner.capture_state(request.adapter_id)
                return out
            if isinstance(request, CreateAdapter):
                self.runner.create_adapter(request.adapter_id, request.spec)
                return self._info(request.adapter_id)
            if isinstance(request, DeleteAdapter):
                self.runner.delete_adapter(request.adapter_id)
                return None
            if isinstance(request, SaveState):
                path = self.runner.save_state(request.adapter_id, request.path, request.include_optimizer)
                return SaveOutput(str(path), self.runner.adapters.get(request.adapter_id).version)
            if isinstance(request, LoadState):
                self.runner.load_state(request.adapter_id, request.path)
                return self._info(request.adapter_id)
        except HotLoraError as err:
            return err
        return InvalidRequest(f"{type(request).__name__} is not a barrier")

    def _info(self, adapter_id: str) -> AdapterInfo:
        return next(info for info in self.runner.list_adapters() if info.adapter_id == adapter_id)

    def _run_train(self, step: TrainSlice, done: Done) -> None:
        whole = [item.request_id for item in step.items if item.request_id not in self._splits]
        calls = [self._requests[request_id] for request_id in whole]
        assert all(isinstance(call, ForwardBackward) for call in calls)
        if calls:
            outputs = self.runner.forward_backward_many(calls)  # type: ignore[arg-type]
            done.extend(zip(whole, outputs, strict=True))
        for item in step.items:
            if item.request_id in self._splits:
                done.append((item.request_id, self._run_part(item.request_id)))

    def _run_part(self, part_id: str) -> Any:
        """One part of a split call (``engine.split_calls``): validate the whole call before the first,
        set the gradient aside, add the sum after the last; skipped once an earlier part failed."""
        split, part = self._splits[part_id], self._requests[part_id]
        assert isinstance(part, ForwardBackward)
        if split.error is not None:
            return split.error
        index = split.index(part_id)
        try:
            if index == 0:
                self.runner.validate_call(split.call)
            if part.forward_only:
                return self.runner.forward_backward_many([part])[0]
            output, split.aside = self.runner.forward_backward_aside(part, split.aside)
            if index == len(split.parts) - 1:
                self.runner.add_gradients(part.adapter_id, split.aside)
                split.aside = None
            return output
        except HotLoraError as err:
            return err

    def _run_decode(self, step: DecodeSlice, done: Done) -> None:
        """Admit, then decode; ``done`` fills as requests finish, so a later failure loses none of them.

        The slice ends early, after any step, once a request is submitted: a newcomer then waits for one
        decode step, not for ``decode_steps_per_slice`` of them, before the scheduler sees it. It
        runs past its steps while sampling has had less time than the last training slice (see
        ``_train_seconds``), so sampling and training share the model's time, not its slices.
        """
        assert self.sampler is not None
        for item in step.admit:
            request = self._requests[item.request_id]
            assert isinstance(request, Sample)
            try:
                self.sampler.add(request)
            except HotLoraError as err:
                done.append((item.request_id, err))
        self._decode_cut = False
        budget = self._train_seconds - self._decode_since_train
        started, steps = time.perf_counter(), 0
        while True:
            for request_id, sequences in self.sampler.step():
                version = sequences[0].adapter_version if sequences else 0
                done.append((request_id, SampleOutput(sequences, version)))
            done.extend(self.sampler.pop_failures().items())
            steps += 1
            if not self.sampler.has_unfinished():
                break
            if self._preempt.is_set():
                self._decode_cut = True  # a newcomer: the scheduler decides again (at least one step ran)
                break
            if steps >= step.steps and time.perf_counter() - started >= budget:
                break
        rows = self.sampler.tenant_rows()
        self.tenant_rows = {(adapter or BASE_ADAPTER): held for adapter, held in rows.items()}
        self.row_steps = {
            (adapter or BASE_ADAPTER): (steps, self.sampler.shared_row_steps[adapter])
            for adapter, steps in self.sampler.row_steps.items()
        }
