"""The real ``tinker`` SDK (0.38.x, the dev extra's) against the gateway, over a real broker and engine.

One engine service and one gateway serve the whole module (``tests.gateway_harness``); each test makes
its own sessions and models, so the tests do not share state. The SDK is synchronous and runs its own
loop thread; every wait it does is bounded by the futures' results, never by sleeps here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

from hotlora.agents import HotLoraClient
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.types import AdamParams, Datum
from hotlora.gateway import tinker_api as api
from hotlora.gateway.tenants import derived_identity
from tests.gateway_harness import GatewayHarness

pytestmark = pytest.mark.timeout(300)

ALICE, BOB = "tml-alice-gateway-test", "tml-bob-gateway-test"


@pytest.fixture(scope="module")
def gateway(
    broker: EmbeddedBroker, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayHarness]:
    checkpoints = tmp_path_factory.mktemp("gateway-checkpoints")
    prefix = f"t-gateway-{time.monotonic_ns() % 10**9}"
    harness = GatewayHarness(
        broker.bootstrap, prefix, tiny_model_path, checkpoints, gateway_overrides={"long_poll_s": 5.0}
    )
    with harness:
        yield harness


def service(gateway: GatewayHarness, key: str = ALICE) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=gateway.base_url, api_key=key)


def sft_datum(tokens: list[int], prompt_len: int = 2) -> types.Datum:
    weights = np.array([0.0 if i + 1 < prompt_len else 1.0 for i in range(len(tokens) - 1)], dtype=np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64), "weights": weights},
    )


SFT_DATA = [[5, 9, 17, 17, 17, 40, 41, 42], [5, 9, 17, 40, 41, 42, 43, 44, 45], [5, 9, 60, 61, 62]]


def stored_weights(gateway: GatewayHarness, key: str, path: str) -> dict[str, torch.Tensor]:
    checkpoint = api.Checkpoint.parse(path)
    return load_file(
        gateway.checkpoint_dir / checkpoint.storage_path(derived_identity(key).principal) / "adapter_model.safetensors"
    )


# ----- training -----


def test_sft_loop_trains_and_equals_the_same_steps_through_hotlora_client(gateway: GatewayHarness) -> None:
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=11).result()
    assert tc.get_info().lora_rank == 4
    data = [sft_datum(tokens) for tokens in SFT_DATA]
    adam = types.AdamParams(learning_rate=5e-3)
    losses, versions = [], []
    for _ in range(6):
        fwd = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)  # submitted before the forward_backward is done, as the SDK intends
        out = fwd.result()
        losses.append(out.metrics["loss:sum"])
        versions.append(opt.result().metrics["version"])
        assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [len(t) - 1 for t in SFT_DATA]
    assert versions == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert losses[-1] < 0.8 * losses[0], losses
    assert (
        gateway.gateway is not None and gateway.gateway.stats["forward_backward:protobuf"] >= 6
    )  # SDK 0.38 sends protobuf
    saved = tc.save_state("final").result().path
    assert saved == f"tinker://{tc.model_id}/weights/final"

    # The same steps through HotLoraClient (same seed, rank, alpha, targets; Adam with the SDK's defaults).
    async def direct() -> str:
        async with HotLoraClient(gateway.bootstrap, gateway.prefix, request_timeout=60) as client:
            await client.create_adapter("direct-sft", rank=4, alpha=32.0, targets="all-linear", seed=11)
            datums = [Datum.from_sequence(tokens, prompt_len=2) for tokens in SFT_DATA]
            for _ in range(6):
                await client.forward_backward("direct-sft", datums, "cross_entropy")
                await client.optim_step("direct-sft", AdamParams(learning_rate=5e-3, grad_clip_norm=0.0))
            return (await client.save_state("direct-sft", "direct/final", include_optimizer=False)).path

    direct_path = Path(gateway.call(direct))
    via_sdk = stored_weights(gateway, ALICE, saved)
    via_client = load_file(direct_path / "adapter_model.safetensors")
    assert via_sdk.keys() == via_client.keys() and via_sdk
    for name, tensor in via_sdk.items():
        torch.testing.assert_close(tensor, via_client[name], rtol=0, atol=1e-6, msg=name)
    sc.close("success").result()


def test_rl_loop_samples_with_logprobs_and_trains_with_importance_sampling(gateway: GatewayHarness) -> None:
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=8, seed=2).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = [5, 9, 17]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    for step in range(3):
        result = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
        assert len(result.sequences) == 4
        rewards = [sum(t % 2 == 0 for t in seq.tokens) for seq in result.sequences]  # even tokens are good
        mean = sum(rewards) / len(rewards)
        data = []
        for seq, reward in zip(result.sequences, rewards, strict=True):
            assert len(seq.logprobs) == len(seq.tokens) and all(lp <= 0 for lp in seq.logprobs)
            tokens = prompt + seq.tokens
            n_prompt = len(prompt) - 1
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": np.array(tokens[1:], dtype=np.int64),
                    "logprobs": np.array([0.0] * n_prompt + seq.logprobs, dtype=np.float32),
                    "advantages": np.array([0.0] * n_prompt + [reward - mean] * len(seq.tokens), dtype=np.float32),
                },
            ))  # fmt: skip
        out = tc.forward_backward(data, "importance_sampling").result()
        # On-policy: the trainer's logprobs of the sampled tokens are the sampler's (fp32 engine).
        for datum, seq, output in zip(data, result.sequences, out.loss_fn_outputs, strict=True):
            trainer = np.asarray(output["logprobs"].data)[len(prompt) - 1 :]
            np.testing.assert_allclose(trainer, seq.logprobs, atol=1e-4)
            assert datum.model_input.length == len(output["logprobs"].data)
        assert math.isfinite(out.metrics["loss:sum"])
        assert tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == step + 1
        sampler = tc.save_weights_and_get_sampling_client().result()
    sc.close("success").result()


def test_a_sampling_client_keeps_sampling_the_weights_it_was_created_from(gateway: GatewayHarness) -> None:
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=8, seed=5).result()
    prompt = types.ModelInput.from_ints([5, 9])
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    before = tc.save_weights_and_get_sampling_client().result()
    first = before.sample(prompt, 1, greedy).result().sequences[0]
    # Train hard towards a completion the base model does not produce.
    target = [5, 9, 99, 98, 97, 96, 95, 94]
    for _ in range(12):
        tc.forward_backward([sft_datum(target)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2))
    after = tc.save_weights_and_get_sampling_client().result()
    changed = after.sample(prompt, 1, greedy).result().sequences[0]
    assert changed.tokens != first.tokens, "training should have changed the greedy completion"
    again = before.sample(prompt, 1, greedy).result().sequences[0]
    assert again.tokens == first.tokens
    np.testing.assert_allclose(again.logprobs, first.logprobs, atol=1e-5)

    # Retire every idle frozen copy: the old client's next sample reloads its checkpoint, same weights.
    frozen = gateway.gateway.frozen  # type: ignore[union-attr]
    loads = frozen.loads

    async def retire() -> int:
        return frozen.retire_idle(force=True)

    assert gateway.call(retire) >= 2
    reloaded = before.sample(prompt, 1, greedy).result().sequences[0]
    assert reloaded.tokens == first.tokens and frozen.loads == loads + 1
    sc.close("success").result()


@pytest.mark.filterwarnings("ignore:DEPRECATED. TrainingClient.load_state:FutureWarning")
def test_forward_custom_loss_checkpoints_and_restore(gateway: GatewayHarness) -> None:
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=3).result()
    data = [sft_datum(tokens) for tokens in SFT_DATA]
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    forward = tc.forward(data, "cross_entropy").result()
    # forward changes nothing: the next forward_backward sees the same logprobs and no extra gradient.
    fwd_bwd = tc.forward_backward(data, "cross_entropy").result()
    assert forward.metrics["loss:sum"] == pytest.approx(fwd_bwd.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(forward.loss_fn_outputs, fwd_bwd.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].data, b["logprobs"].data, atol=1e-6)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    # forward_backward_custom: the SDK's forward, then cross-entropy with weights = -dLoss/dlogprobs.
    def squared(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((lp**2).sum() for lp in logprobs)
        return loss, {"squared:sum": float(loss.detach())}

    custom = tc.forward_backward_custom(data, squared).result()
    assert custom.metrics["squared:sum"] > 0 and "surrogate_loss:sum" in custom.metrics
    assert tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 3.0

    state = tc.save_state("three").result().path
    sampler_path = tc.save_weights_for_sampler("three-sampler").result().path
    rest = tinker.RestClient(base_url=gateway.base_url, api_key=ALICE)
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {(c.checkpoint_type, c.tinker_path) for c in listed} >= {("training", state), ("sampler", sampler_path)}
    assert rest.get_training_run(tc.model_id).result().lora_rank == 4
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs().result().training_runs}

    # Train on, then load the saved state back: the same logprobs as right after the save.
    at_save = tc.forward(data, "cross_entropy").result()
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    tc.load_state(state).result()
    restored = tc.forward(data, "cross_entropy").result()
    assert restored.metrics["loss:sum"] == pytest.approx(at_save.metrics["loss:sum"], rel=1e-5)
    # A new training client from the saved state (one load_weights with session addressing).
    clone = sc.create_training_client_from_state_with_optimizer(state).result()
    assert clone.model_id != tc.model_id and clone.get_info().lora_rank == 4
    cloned = clone.forward(data, "cross_entropy").result()
    assert cloned.metrics["loss:sum"] == pytest.approx(at_save.metrics["loss:sum"], rel=1e-5)
    # A sampling client from the named sampler checkpoint, through a fresh service client.
    other = service(gateway)
    sampled = other.create_sampling_client(model_path=sampler_path).result()
    assert sampled.sample(types.ModelInput.from_ints([5, 9]), 2, types.SamplingParams(max_tokens=3)).result().sequences
    other.close("success").result()
    sc.close("success").result()


def test_top_k_cross_entropy_equals_its_columns_trained_alone(gateway: GatewayHarness) -> None:
    """Targets of shape (N, K): -sum_t sum_k w[t,k] log p(x[t,k]), logprobs of shape (N, K)."""
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=9).result()
    tokens = [5, 9, 17, 40, 41]
    targets = np.array([[9, 10], [17, 3], [40, 41], [41, 7]], dtype=np.int64)
    weights = np.array([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]], dtype=np.float32)
    top_k = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    out = tc.forward([top_k], "cross_entropy").result()
    logprobs = out.loss_fn_outputs[0]["logprobs"]
    assert logprobs.shape == [4, 2]
    expected_loss = 0.0
    for k in range(2):
        column = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": targets[:, k].copy(), "weights": weights[:, k].copy()},
        )
        alone = tc.forward([column], "cross_entropy").result()
        np.testing.assert_allclose(
            np.asarray(logprobs.data).reshape(4, 2)[:, k], alone.loss_fn_outputs[0]["logprobs"].data, atol=1e-6
        )
        expected_loss += alone.metrics["loss:sum"]
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    trained = tc.forward_backward([top_k], "cross_entropy").result()
    assert trained.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 1.0
    sc.close("success").result()


def test_rl_losses_follow_tinkers_formulas_through_the_sdk(gateway: GatewayHarness) -> None:
    """ppo with a low threshold above 1, cispo's default [0, 4], per-datum thresholds, gspo and dro: each
    ``forward`` loss is Tinker's formula over the trainer's logprobs, and ``forward_backward`` trains on it."""
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=12).result()
    tokens = [5, 9, 17, 40, 41, 3, 22]
    n = len(tokens) - 1
    plain = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:]), "weights": np.ones(n, np.float32)},
    )
    lp = np.asarray(tc.forward([plain], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data, np.float64)
    rng = np.random.default_rng(4)
    q = (lp + rng.normal(0, 0.7, n)).astype(np.float32)
    adv = rng.normal(0, 1, n).astype(np.float32)
    mask = np.array([0, 0, 1, 1, 1, 1], np.float32)
    ratio = np.exp(lp - q)
    seq = np.exp(((lp - q) * mask).sum() / mask.sum())

    def rl(**extra: np.ndarray) -> types.Datum:
        inputs = {"target_tokens": np.array(tokens[1:]), "logprobs": q, "advantages": adv, **extra}
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)

    def ppo(r: np.ndarray | float, low: float, high: float | np.ndarray) -> float:
        return float(-np.minimum(r * adv, np.clip(r, low, high) * adv).sum())

    cases = [
        ("ppo", rl(), {"clip_low_threshold": 1.1, "clip_high_threshold": 2.0}, ppo(ratio, 1.1, 2.0)),
        ("cispo", rl(), None, float(-(np.clip(ratio, 0.0, 4.0) * lp * adv).sum())),
        ("ppo", rl(clip_high_threshold=np.full(n, 1.05, np.float32)), None, ppo(ratio, 0.8, 1.05)),
        ("gspo", rl(sequence_ratio_mask=mask), None, ppo(seq, 0.8, 1.2)),
        ("dro", rl(), {"beta": 0.3}, float(-(lp * adv - 0.15 * (lp - q) ** 2).sum())),
    ]
    for loss_fn, datum, config, expected in cases:
        got = tc.forward([datum], loss_fn, loss_fn_config=config).result()
        assert got.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5), loss_fn
        np.testing.assert_allclose(got.loss_fn_outputs[0]["logprobs"].data, lp, atol=1e-5)
    trained = tc.forward_backward([cases[3][1]], "gspo").result()
    assert trained.metrics["loss:sum"] == pytest.approx(cases[3][3], rel=1e-4, abs=1e-5)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 1.0
    after = np.asarray(tc.forward([plain], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data)
    assert not np.allclose(after, lp, atol=1e-6), "the gspo step changed nothing"
    with pytest.raises(tinker.BadRequestError, match="beta"):
        tc.forward([rl()], "dro").result()
    with pytest.raises(tinker.BadRequestError, match="sequence_ratio_mask"):
        tc.forward_backward([rl()], "gspo").result()
    sc.close("success").result()


def test_calls_the_gateway_cannot_serve_fail_at_once_with_the_reason(gateway: GatewayHarness) -> None:
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=1).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    started = time.monotonic()
    with pytest.raises(tinker.BadRequestError, match="topk_prompt_logprobs"):
        sampler.sample(
            types.ModelInput.from_ints([5, 9, 17]), 1, types.SamplingParams(max_tokens=2), topk_prompt_logprobs=3
        ).result()
    rl = types.Datum(
        model_input=types.ModelInput.from_ints([5, 9]),
        loss_fn_inputs={
            "target_tokens": np.array([9, 17]),
            "logprobs": np.zeros(2, np.float32),
            "advantages": np.ones(2, np.float32),
        },
    )
    with pytest.raises(tinker.BadRequestError, match="stable_reinforce"):
        tc.forward_backward([rl], "stable_reinforce").result()
    with pytest.raises(tinker.NotFoundError, match="not supported"):
        tinker.RestClient(base_url=gateway.base_url, api_key=ALICE).publish_checkpoint_from_tinker_path(
            f"tinker://{tc.model_id}/weights/x"
        ).result()
    with pytest.raises(tinker.BadRequestError, match="not served"):
        sc.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4).result()
    assert time.monotonic() - started < 30
    sc.close("errored").result()


def test_compute_logprobs_scores_the_prompt_with_the_samplers_weights(gateway: GatewayHarness) -> None:
    sc = service(gateway)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=6).result()
    tokens = [5, 9, 17, 40, 41]
    data = [sft_datum(tokens, prompt_len=0)]
    base_forward = np.asarray(tc.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data)
    base = sc.create_sampling_client(base_model=str(gateway.model)).result()
    scored = base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert scored[0] is None and len(scored) == len(tokens)
    np.testing.assert_allclose(scored[1:], base_forward, atol=1e-5)  # a fresh LoRA is the base model exactly
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2))
    trained = tc.save_weights_and_get_sampling_client().result()
    expected = np.asarray(tc.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data)
    np.testing.assert_allclose(
        trained.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:], expected, atol=1e-5
    )
    last = trained.compute_logprobs(types.ModelInput.from_ints(tokens), prompt_logprobs_last_n=2).result()
    assert last[:3] == [None, None, None]
    np.testing.assert_allclose(last[3:], expected[-2:], atol=1e-5)
    sc.close("success").result()


# ----- tenancy -----


def test_another_key_is_refused_on_every_verb(gateway: GatewayHarness) -> None:
    sc = service(gateway, ALICE)
    tc = sc.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=4).result()
    data = [sft_datum(SFT_DATA[0])]
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = tc.save_state("mine").result().path
    sampler_path = tc.save_weights_for_sampler("mine-sampler").result().path
    model = tc.model_id
    session = api.session_of(model)

    http = httpx.Client(base_url=gateway.base_url, headers={"X-API-Key": BOB}, timeout=60)
    seen: dict[str, tuple[int, str]] = {}

    def outcome(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        """An HTTP refusal's status and detail, or a future's failure (status 200 plus the error)."""
        response = http.request(method, f"/api/v1/{path}", json=body)
        if response.status_code != 200 or "request_id" not in response.json():
            return response.status_code, response.text
        request_id = response.json()["request_id"]
        while True:
            polled = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
            if polled.status_code != 408:
                return polled.status_code, polled.text

    datum_json = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": SFT_DATA[0][:-1]}]},
        "loss_fn_inputs": {"target_tokens": {"data": SFT_DATA[0][1:], "dtype": "int64"}},
    }
    fb = {"model_id": model, "forward_backward_input": {"data": [datum_json], "loss_fn": "cross_entropy"}}
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [5, 9]}]}
    attempts = {
        "get_info": ("POST", "get_info", {"model_id": model}),
        "forward_backward": ("POST", "forward_backward", fb),
        "forward": ("POST", "forward", {"model_id": model, "forward_input": fb["forward_backward_input"]}),
        "optim_step": ("POST", "optim_step", {"model_id": model, "adam_params": {"learning_rate": 1.0}}),
        "save_weights": ("POST", "save_weights", {"model_id": model, "path": "stolen"}),
        "save_weights_for_sampler": ("POST", "save_weights_for_sampler", {"model_id": model, "path": "stolen"}),
        "load_weights into the model": ("POST", "load_weights", {"model_id": model, "path": state, "optimizer": True}),
        "load_weights as a new model": (
            "POST", "load_weights",
            {"session_id": session, "model_seq_id": 77, "path": state, "optimizer": True},
        ),
        "asample a sampler checkpoint": (
            "POST", "asample",
            {"model_path": sampler_path, "prompt": prompt, "sampling_params": {"max_tokens": 2}, "num_samples": 1},
        ),
        "weights_info": ("POST", "weights_info", {"tinker_path": state}),
        "list checkpoints": ("GET", f"training_runs/{model}/checkpoints", None),
        "training run": ("GET", f"training_runs/{model}", None),
        "unload_model": ("POST", "unload_model", {"model_id": model}),
    }  # fmt: skip
    for verb, (method, path, body) in attempts.items():
        status, text = seen[verb] = outcome(method, path, body)
        refused = 400 <= status < 500 or (status == 200 and '"error"' in text)
        assert refused, f"{verb}: another key was answered {status} {text[:300]}"
        assert "forbidden" in text or "not found" in text, (verb, text[:300])
        assert str(gateway.checkpoint_dir) not in text, "the engine's storage paths stay private"
    listed = http.get("/api/v1/training_runs").json()["training_runs"]
    assert model not in {run["training_run_id"] for run in listed}
    # Alice's futures are hers alone.
    alice_sample = {"base_model": str(gateway.model), "prompt": prompt, "sampling_params": {"max_tokens": 2}}
    alice_future = http.post("/api/v1/asample", json=alice_sample, headers={"X-API-Key": ALICE}).json()["request_id"]
    assert http.post("/api/v1/retrieve_future", json={"request_id": alice_future}).status_code == 404
    # The engine refused the verbs that reached it as forbidden (the others never found Alice's model).
    for verb in ("forward_backward", "forward", "optim_step", "save_weights", "load_weights into the model"):
        assert "forbidden" in seen[verb][1], (verb, seen[verb])

    # Through the SDK too: Bob's sampling client on Alice's checkpoint fails.
    bob = service(gateway, BOB)
    with pytest.raises((tinker.RequestFailedError, tinker.APIStatusError)):
        bob.create_sampling_client(model_path=sampler_path).result().sample(
            types.ModelInput.from_ints([5]), 1, types.SamplingParams(max_tokens=2)
        ).result()
    bob.close("success").result()

    # Nothing Bob tried changed Alice's model.
    assert tc.get_info().lora_rank == 4
    assert tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 2.0
    http.close()
    sc.close("success").result()


# ----- several gateways -----


def test_a_second_gateway_serves_the_same_models(gateway: GatewayHarness, tmp_path: Path) -> None:
    """Gateways keep no model state: a training client that moves to another gateway (its own restarted, or
    a load balancer failed over) continues its model in order there, and samples the same checkpoints. Only
    futures are local. (One training client goes through one gateway at a time: see docs/tinker.md.)"""
    other = GatewayHarness(gateway.bootstrap, gateway.prefix, gateway.model, gateway.checkpoint_dir, with_engine=False)
    with other:
        first = service(gateway)
        tc = first.create_lora_training_client(base_model=str(gateway.model), rank=4, seed=8).result()
        data = [sft_datum(tokens) for tokens in SFT_DATA]
        for _ in range(2):
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler_path = tc.save_weights_for_sampler("moved").result().path
        greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
        prompt = types.ModelInput.from_ints([5, 9])
        expected = first.create_sampling_client(model_path=sampler_path).result().sample(prompt, 1, greedy).result()

        # The same model through the second gateway: the client there resumes the adapter's seq first.
        second = service(other)
        moved = tinker.TrainingClient(second.holder, model_seq_id=0, model_id=tc.model_id, info=tc.get_info())
        out = moved.forward_backward(data, "cross_entropy").result()
        assert math.isfinite(out.metrics["loss:sum"])
        assert moved.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 3.0
        sampled = second.create_sampling_client(model_path=sampler_path).result().sample(prompt, 1, greedy).result()
        assert sampled.sequences[0].tokens == expected.sequences[0].tokens
        listed = tinker.RestClient(base_url=other.base_url, api_key=ALICE).list_checkpoints(tc.model_id).result()
        assert sampler_path in {c.tinker_path for c in listed.checkpoints}
        assert moved.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 4.0

        # A future lives only in the gateway process that made it: elsewhere it is 410 Gone, not a hang.
        request_id = httpx.post(
            f"{gateway.base_url}/api/v1/asample",
            headers={"X-API-Key": ALICE},
            json={"base_model": str(gateway.model), "prompt": {"chunks": [{"tokens": [5]}]}, "sampling_params": {}},
        ).json()["request_id"]
        gone = httpx.post(
            f"{other.base_url}/api/v1/retrieve_future", headers={"X-API-Key": ALICE}, json={"request_id": request_id}
        )
        assert gone.status_code == 410 and "restarted" in gone.json()["detail"]
        second.close("success").result()
        first.close("success").result()
