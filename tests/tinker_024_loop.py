"""Run by ``tests/test_gateway_sdk024.py`` in a subprocess whose ``PYTHONPATH`` puts ``tinker`` 0.24.x first.

An SFT loop, an RL loop and a sampler created before more training, all through the 0.24 SDK's JSON
requests against the gateway at ``argv[1]`` with base model ``argv[2]``. Prints one JSON line of what it saw.
"""

from __future__ import annotations

import json
import sys

import httpx
import numpy as np
import tinker
from tinker import types
from tinker.lib._pydantic_conv import deserialize_json_response


def main(base_url: str, base_model: str) -> None:
    assert tinker.__version__.startswith("0.24."), tinker.__version__
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-sdk-024")
    training = service.create_lora_training_client(base_model=base_model, rank=4, seed=21)
    tokens = [5, 9, 17, 17, 40, 41, 42, 43]
    sft = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:], dtype=np.int64),
            "weights": np.ones(len(tokens) - 1, np.float32),
        },
    )
    losses, versions = [], []
    for _ in range(4):
        fwd = training.forward_backward([sft], "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fwd.result().metrics["loss:sum"])
        versions.append(opt.result().metrics["version"])

    prompt = types.ModelInput.from_ints([5, 9])
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    old = training.save_weights_and_get_sampling_client()
    old_tokens = old.sample(prompt, 1, greedy).result().sequences[0].tokens

    rl_rewards = []
    for _ in range(2):
        result = old.sample(prompt, 3, types.SamplingParams(max_tokens=4, seed=3)).result()
        rewards = [float(sum(t % 2 == 0 for t in s.tokens)) for s in result.sequences]
        rl_rewards.append(sum(rewards) / len(rewards))
        data = []
        for seq, reward in zip(result.sequences, rewards, strict=True):
            full = [5, 9, *seq.tokens]
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={
                    "target_tokens": np.array(full[1:], dtype=np.int64),
                    "logprobs": np.array([0.0, *seq.logprobs], dtype=np.float32),
                    "advantages": np.array([0.0] + [reward - rl_rewards[-1]] * len(seq.tokens), dtype=np.float32),
                },
            ))  # fmt: skip
        training.forward_backward(data, "importance_sampling").result()
        versions.append(training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"])
    for _ in range(8):  # more training; the old sampler must not see it
        training.forward_backward([sft], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=5e-2))
    new_tokens = training.save_weights_and_get_sampling_client().sample(prompt, 1, greedy).result().sequences[0].tokens
    again = old.sample(prompt, 1, greedy).result().sequences[0].tokens
    json_results = check_json_results(base_url, base_model, training.model_id, tokens)
    print(json.dumps({
        "version": tinker.__version__, "losses": losses, "versions": versions, "old": old_tokens, "again": again,
        "new": new_tokens, "model_id": training.model_id, "json_results": json_results,
    }))  # fmt: skip


def check_json_results(base_url: str, base_model: str, model_id: str, tokens: list[int]) -> list[str]:
    """Results asked for as JSON (a client that does not accept protobuf) parse with this SDK's JSON readers."""
    http = httpx.Client(base_url=f"{base_url}/api/v1", headers={"X-API-Key": "tml-sdk-024"}, timeout=60)

    def result(path: str, body: dict, model_cls: type) -> object:
        request_id = http.post(path, json=body).json()["request_id"]
        while (reply := http.post("/retrieve_future", json={"request_id": request_id})).status_code == 408:
            pass
        assert reply.headers["content-type"].startswith("application/json"), reply.headers
        return deserialize_json_response(reply.json(), model_cls)

    prompt = {"chunks": [{"type": "encoded_text", "tokens": tokens[:3]}]}
    sample = result("/asample", {"base_model": base_model, "prompt": prompt, "num_samples": 2,
                                 "sampling_params": {"max_tokens": 3, "seed": 1}}, types.SampleResponse)  # fmt: skip
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
             "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"}}}  # fmt: skip
    forward = result("/forward", {"model_id": model_id, "forward_input": {"data": [datum], "loss_fn": "cross_entropy"}},
                     types.ForwardBackwardOutput)  # fmt: skip
    assert len(sample.sequences) == 2 and len(sample.sequences[0].logprobs) == len(sample.sequences[0].tokens)
    assert len(forward.loss_fn_outputs[0]["logprobs"].tolist()) == len(tokens) - 1 and forward.metrics["loss:sum"] > 0
    return [type(sample).__name__, type(forward).__name__]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
