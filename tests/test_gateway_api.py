"""The gateway's pure parts: the protobuf codec against the SDK's own generated classes, ids and paths,
Tinker's loss settings mapped onto the engine's (checked against ``engine.losses``), lanes and futures."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from hotlora.engine.losses import LossInputs, compute_loss
from hotlora.gateway import proto
from hotlora.gateway import tinker_api as api
from hotlora.gateway.futures import FutureTable, Lanes
from hotlora.gateway.server import Gateway
from hotlora.gateway.tenants import KeyMap, derived_identity
from hotlora.gateway.tinker_api import Checkpoint, TinkerError

# ----- protobuf -----


def _sdk_request(forward_only: bool = False) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3, 70000])]
        ),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 70000, 5]),
            "weights": np.array([0.0, 1.0, 1.0, 0.5], dtype=np.float32),
            "advantages": [0.5, -1.0, 2.0, 0.0],
        },
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum, datum], loss_fn="cispo", loss_fn_config={"clip_high_threshold": 3.5, "note": "x"}
        ),
        model_id="s0123456789ab:train:3",
        seq_id=7,
    )
    message = forward_backward_request_to_proto(request)
    message.forward_only = forward_only
    return message.SerializeToString()


def test_forward_backward_request_decodes_like_the_sdk_encodes_it() -> None:
    request = api.fwdbwd_from_proto(_sdk_request(forward_only=True))
    assert (request.model_id, request.seq_id, request.loss_fn, request.forward_only) == (
        "s0123456789ab:train:3", 7, "cispo", True,
    )  # fmt: skip
    assert request.loss_fn_config == {"clip_high_threshold": 3.5, "note": "x"}  # v2 strings win, floats mirrored
    assert len(request.data) == 2
    datum = request.data[1]
    assert datum.tokens.tolist() == [1, 2, 3, 70000]
    assert datum.inputs["target_tokens"].tolist() == [2, 3, 70000, 5]
    assert datum.inputs["target_tokens"].dtype == np.int64
    np.testing.assert_array_equal(datum.inputs["weights"], np.array([0.0, 1.0, 1.0, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(datum.inputs["advantages"], np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32))


def test_protobuf_is_read_with_unpacked_repeated_fields_and_unknown_fields() -> None:
    message = pb.ForwardBackwardRequest(model_id="s0123456789ab:train:0", seq_id=1, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([4, 5], dtype=np.int32).tobytes()
    tensor = datum.loss_fn_inputs["target_tokens"]
    tensor.dtype = pb.DTYPE_INT64
    tensor.dense = np.array([5, 6], dtype=np.int64).tobytes()
    raw = bytearray(message.SerializeToString())
    # Append an unknown varint field (number 99) and a shape written unpacked, as an older writer might.
    raw += bytes([0x98, 0x06, 0x2A])
    parsed = proto.read_forward_backward(bytes(raw))
    assert parsed.model_id == "s0123456789ab:train:0" and parsed.data[0].tokens().tolist() == [4, 5]
    assert proto._ints(proto.VARINT, 3) == [3] and proto._ints(proto.LEN, bytes([2, 3])) == [2, 3]
    with pytest.raises(TinkerError, match="protobuf"):
        api.fwdbwd_from_proto(b"\x0a\xff")  # a length running past the end


def test_results_decode_with_the_sdks_own_readers() -> None:
    result = api.FwdBwdResult([np.array([-1.0, -2.5], np.float32), np.array([-0.25], np.float32)], [3.5, 0.25])
    output = deserialize_forward_backward_output(result.protobuf())
    assert output.metrics == {"loss:sum": 3.75}
    assert [o["logprobs"].tolist() for o in output.loss_fn_outputs] == [[-1.0, -2.5], [-0.25]]
    mixed = api.FwdBwdResult(
        [np.ones((3, 2), np.float32), np.ones(2, np.float32), np.zeros((1, 2), np.float32)], [1, 2, 3]
    )
    decoded = deserialize_forward_backward_output(mixed.protobuf())  # top-K outputs (N, K) beside 1-D ones
    assert [o["logprobs"].shape for o in decoded.loss_fn_outputs] == [[3, 2], [2], [1, 2]]
    assert mixed.json()["loss_fn_outputs"][0]["logprobs"]["shape"] == [3, 2]
    sample = api.SampleResult([
        proto.OutSequence(np.array([7, 8, 9], np.int32), np.array([-0.5, -1.5, -2.0], np.float32), "length"),
        proto.OutSequence(np.array([3], np.int32), np.array([-0.125], np.float32), "stop"),
    ])  # fmt: skip
    response = deserialize_sample_response(sample.protobuf())
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in response.sequences] == [
        ([7, 8, 9], [-0.5, -1.5, -2.0], "length"), ([3], [-0.125], "stop"),
    ]  # fmt: skip
    assert json.loads(json.dumps(sample.json()))["sequences"][1] == {
        "stop_reason": "stop",
        "tokens": [3],
        "logprobs": [-0.125],
    }


# ----- ids, paths, tenancy -----


def test_ids_and_paths_round_trip_and_are_distinct_per_principal() -> None:
    session = api.new_session_id()
    model = api.model_id_of(session, 2)
    adapter = api.adapter_of(model)
    assert model == f"{session}:train:2" and adapter == f"{session}.train.2" and api.model_of(adapter) == model
    checkpoint = Checkpoint.parse(f"tinker://{model}/sampler_weights/step-10")
    assert checkpoint.tinker_path == f"tinker://{model}/sampler_weights/step-10"
    alice, bob = derived_identity("tml-alice"), derived_identity("tml-bob")
    assert alice.principal != bob.principal and alice.token != bob.token and "tml-alice" not in alice.token
    assert checkpoint.storage_path(alice.principal) != checkpoint.storage_path(bob.principal)
    assert checkpoint.frozen_adapter(alice.principal) != checkpoint.frozen_adapter(bob.principal)
    stored = f"/ckpt/{checkpoint.storage_path(alice.principal)}"
    assert api.checkpoint_from_storage(stored) == (api.principal_dir(alice.principal), checkpoint)
    assert api.sampling_target(api.sampling_session_id(session, 0, checkpoint.tinker_path)) == checkpoint
    assert api.sampling_target(api.sampling_session_id(session, 1, None)) is None
    for bad in ("tinker://x/weights/a", f"tinker://{model}/other/a", f"tinker://{model}/weights/../a", "/etc"):
        with pytest.raises(TinkerError):
            Checkpoint.parse(bad)
    with pytest.raises(TinkerError) as err:
        api.adapter_of("someone-elses-adapter")
    assert err.value.status == 404


def test_key_map_file_admits_only_listed_keys(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tml-a": "team-a", "tml-b": {"principal": "team-b", "token": "secret-b"}}))
    keys = KeyMap.from_file(path)
    assert keys.identify("tml-a").principal == "team-a"
    assert keys.identify("tml-b").token == "secret-b"
    for key in ("tml-c", "", None):
        with pytest.raises(TinkerError) as err:
            keys.identify(key)
        assert err.value.status == 401
    assert KeyMap().identify("tml-anyone") == derived_identity("tml-anyone")


# ----- losses -----


def test_loss_configs_pass_to_the_engine_as_tinkers_settings() -> None:
    # The engine takes Tinker's absolute thresholds and beta, with Tinker's defaults: nothing to translate.
    assert api.engine_loss_config("ppo", {}) == {}
    assert api.engine_loss_config("cispo", {"clip_high_threshold": 5}) == {"clip_high_threshold": 5.0}
    config = {"clip_low_threshold": 1.1, "clip_high_threshold": 2.0}  # a low bound above 1 is fine now
    assert api.engine_loss_config("gspo", config) == config
    assert api.engine_loss_config("ppo", {"clip_high_threshold": 0.9, "clip_low_threshold": 0.5}) == {
        "clip_high_threshold": 0.9,
        "clip_low_threshold": 0.5,
    }
    assert api.engine_loss_config("dro", {"beta": 0.05}) == {"beta": 0.05}
    assert api.engine_loss_config("importance_sampling", {}) == {}
    for loss_fn, config_in, match in [
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 0.8}, "above"),
        ("ppo", {"clip_high_threshold": 0.5}, "above"),  # below the default low threshold, 0.8
        ("cispo", {"clip_low_threshold": -1.0}, ">= 0"),
        ("ppo", {"clip_epsilon": 0.1}, "not understood"),  # hotlora's offsets are not Tinker's keys
        ("ppo", {"clip_high_threshold": float("nan")}, "finite"),
        ("dro", {}, "beta"),
        ("cross_entropy", {"x": 1.0}, "takes no loss_fn_config"),
        ("stable_reinforce", {}, "not supported"),
        ("custom", {}, "not supported"),
        ("nonsense", {}, "unknown loss_fn"),
    ]:
        with pytest.raises(TinkerError, match=match):
            api.engine_loss_config(loss_fn, config_in)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo", "cispo", "gspo", "dro"])
def test_the_engine_computes_tinkers_formula_from_the_gateways_datum(loss_fn: str) -> None:
    """The gateway's engine datum and config give the engine's loss Tinker's documented value (numpy here)."""
    gen = np.random.default_rng(0)
    n = 12
    lp = -gen.random(n).astype(np.float32) * 3
    mask = (np.arange(n) >= 4).astype(np.float32)
    inputs = {
        "target_tokens": gen.integers(0, 50, n),
        "weights": (gen.random(n) > 0.3).astype(np.float32),
        "logprobs": (lp + gen.normal(0, 0.8, n)).astype(np.float32),  # ratios well outside [0.8, 1.2]
        "advantages": gen.normal(0, 1, n).astype(np.float32),
    }
    if loss_fn == "cross_entropy":
        inputs = {k: inputs[k] for k in ("target_tokens", "weights")}
    if loss_fn == "gspo":
        inputs["sequence_ratio_mask"] = mask
    if loss_fn == "ppo":
        inputs["clip_high_threshold"] = np.asarray([1.5], np.float32)  # one threshold for the whole datum
    datum = api.TDatum(np.arange(n), inputs)
    api.check_datum(loss_fn, 0, datum)
    tinker_config = {"ppo": {"clip_low_threshold": 0.7}, "dro": {"beta": 0.2}}.get(loss_fn, {})
    config = api.engine_loss_config(loss_fn, tinker_config)
    w, q, adv = inputs["weights"].astype(np.float64), inputs.get("logprobs"), inputs.get("advantages")
    lp64 = lp.astype(np.float64)
    ratio = None if q is None else np.exp(lp64 - q)
    seq = None if q is None else np.exp(((lp64 - q) * mask).sum() / mask.sum())
    expected = {
        "cross_entropy": lambda: -(w * lp64).sum(),
        "importance_sampling": lambda: -(w * ratio * adv).sum(),
        "ppo": lambda: -(w * np.minimum(ratio * adv, np.clip(ratio, 0.7, 1.5) * adv)).sum(),
        "cispo": lambda: -(w * np.clip(ratio, 0.0, 4.0) * lp64 * adv).sum(),
        "gspo": lambda: -(w * np.minimum(seq * adv, np.clip(seq, 0.8, 1.2) * adv)).sum(),
        "dro": lambda: -(w * (lp64 * adv - 0.1 * (lp64 - q) ** 2)).sum(),
    }[loss_fn]()
    engine_datum = Gateway._engine_datum(datum)

    def row(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[None].double()

    got = compute_loss(
        loss_fn,
        LossInputs(
            torch.from_numpy(lp)[None].double(),
            row(engine_datum.weights),
            row(engine_datum.logprobs),
            row(engine_datum.advantages),
            clip_low=None if engine_datum.clip_low_threshold is None else row(engine_datum.clip_low_threshold),
            clip_high=None if engine_datum.clip_high_threshold is None else row(engine_datum.clip_high_threshold),
            ratio_mask=row(engine_datum.sequence_ratio_mask),
        ),
        config,
    )
    assert float(got[0]) == pytest.approx(float(expected), rel=1e-5)


def test_datums_the_engine_cannot_train_on_yet_are_refused_with_the_reason() -> None:
    tokens = np.arange(4)
    top_k = api.TDatum(tokens, {"target_tokens": np.zeros((4, 2), np.int64), "weights": np.ones((4, 2), np.float32)})
    api.check_datum("cross_entropy", 0, top_k)  # served as K datums
    assert [c.inputs["target_tokens"].shape for c in api.columns(top_k)] == [(4,), (4,)]
    with pytest.raises(TinkerError, match=r"top-K"):
        api.check_datum("importance_sampling", 0, top_k)
    clips = api.TDatum(tokens, {"target_tokens": tokens, "clip_low_threshold": np.zeros(4, np.float32)})
    with pytest.raises(TinkerError, match="not used by 'importance_sampling'"):
        api.check_datum("importance_sampling", 0, clips)
    clips.inputs |= {"logprobs": np.zeros(4, np.float32), "advantages": np.ones(4, np.float32)}
    api.check_datum("ppo", 0, clips)  # per-token thresholds: served
    with pytest.raises(TinkerError, match="sequence_ratio_mask"):
        api.check_datum("gspo", 0, clips)
    short = api.TDatum(tokens, {"target_tokens": tokens[:3]})
    with pytest.raises(TinkerError, match="shape"):
        api.check_datum("cross_entropy", 0, short)
    with pytest.raises(TinkerError, match="needs logprobs and advantages"):
        api.check_datum("importance_sampling", 0, api.TDatum(tokens, {"target_tokens": tokens}))
    with pytest.raises(TinkerError, match="not supported"):
        api.prompt_logprobs_request({"topk_prompt_logprobs": 5}, 4)
    assert api.prompt_logprobs_request({"prompt_logprobs": True}, 4) == 3
    assert api.prompt_logprobs_request({"prompt_logprobs": True, "prompt_logprobs_last_n": 2}, 4) == 2
    assert api.prompt_logprobs_request({}, 4) is None
    params = api.sample_params({"sampling_params": {"stop": [5, 7], "top_k": -1, "seed": 2**64 - 1}})
    assert (params.stop, params.top_k, params.max_tokens) == ((5, 7), 0, api.DEFAULT_MAX_TOKENS)
    assert 0 <= params.seed < 2**63


# ----- lanes and futures -----


def test_lanes_start_in_seq_order_and_give_up_a_gap() -> None:
    async def main() -> None:
        started: list[int] = []
        lanes = Lanes(gap_timeout=0.05)
        lanes.admit("m", 5, lambda: started.append(5))  # first seen: the lane starts here
        lanes.admit("m", 7, lambda: started.append(7))
        lanes.admit("m", 8, lambda: started.append(8))
        assert started == [5]
        lanes.admit("m", 6, lambda: started.append(6))
        assert started == [5, 6, 7, 8]
        lanes.skip("m", 9)  # refused before it started: its successor need not wait
        lanes.admit("m", 10, lambda: started.append(10))
        lanes.admit("m", 12, lambda: started.append(12))  # 11 never comes
        lanes.admit("x", None, lambda: started.append(0))  # unordered: at once
        assert started == [5, 6, 7, 8, 10, 0]
        await asyncio.sleep(0.2)
        assert started == [5, 6, 7, 8, 10, 0, 12]
        lanes.admit("m", 11, lambda: started.append(11))  # late: runs at once
        assert started[-1] == 11

    asyncio.run(main())


def test_futures_are_private_to_their_key_and_gone_after_a_restart() -> None:
    async def main() -> None:
        table = FutureTable(keep_s=60.0)
        entry = table.create("alice")

        async def work() -> str:
            return "done"

        table.run(entry, work())
        assert await table.wait(entry, 1.0) and entry.future.result() == "done"
        with pytest.raises(TinkerError) as other:
            table.get(entry.request_id, "bob")
        assert other.value.status == 404
        with pytest.raises(TinkerError) as restarted:
            FutureTable().get(entry.request_id, "alice")  # another process: 410, so the SDK retries a sample
        assert restarted.value.status == 410
        slow = table.create("alice")
        assert not await table.wait(slow, 0.01)  # not done: the caller answers "try again"
        table.fail(slow, TinkerError("no"))
        table.sweep(now=entry.created + 3600)
        assert len(table) == 0

    asyncio.run(main())


def test_any_principal_gets_a_valid_reply_topic() -> None:
    from hotlora.gateway.server import Gateway, GatewayConfig
    from hotlora.gateway.tenants import Identity

    gateway = Gateway(GatewayConfig(bootstrap="127.0.0.1:1"))
    client = gateway._new_client(Identity("team a/ü:x", "secret"))  # validates its reply topic's name
    assert client.reply_topic.startswith("hotlora.replies.gw-") and client.principal == "team a/ü:x"
