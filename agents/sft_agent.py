"""The SFT smoke agent: one experiment, one adapter, a whole training loop on one screen.

Until the RL agent lands this is what ``hotlora agent --task sft`` and the Kafka demo run: the
adapter learns to answer a fixed prompt with its own target, through the public client verbs only.
Progress goes to stdout as one JSON object per line, so a parent process can show it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from hotlora.agents.client import HotLoraClient
from hotlora.agents.tokenizer import TextTokenizer
from hotlora.engine.types import AdamParams, Datum, LoraSpec, SamplingParams

PROMPT = "favourite thing:"
TARGETS = [" the sea at dawn", " 12+30=42, always", " count a in banana: 3", " reverse abc: cba"]


@dataclass
class SftAgentConfig:
    bootstrap: str
    adapter_id: str
    model: str  # the base model directory, for its tokenizer
    steps: int = 60
    rank: int = 8
    learning_rate: float = 3e-3
    grad_clip_norm: float = 1.0  # explicit: AdamParams' default is the Tinker SDK's 0.0 (no clipping)
    seed: int = 0
    topic_prefix: str = "hotlora"
    target: str | None = None


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def run_sft_agent(cfg: SftAgentConfig) -> int:
    tokenizer = TextTokenizer.from_model_dir(cfg.model)
    target = cfg.target if cfg.target is not None else TARGETS[cfg.seed % len(TARGETS)]
    prompt = tokenizer.with_bos(PROMPT)
    answer = [*tokenizer.encode(target), tokenizer.eos_token_id]
    datum = Datum.from_sequence(prompt + answer, prompt_len=len(prompt))
    greedy = SamplingParams(max_tokens=len(answer) + 4, temperature=0.0)
    async with HotLoraClient(cfg.bootstrap, topic_prefix=cfg.topic_prefix) as client:
        await client.create_adapter(cfg.adapter_id, LoraSpec(rank=cfg.rank, seed=cfg.seed))
        start = time.perf_counter()
        text = ""
        for step in range(cfg.steps):
            sample = await client.sample(cfg.adapter_id, prompt, n=1, params=greedy)
            text = tokenizer.decode(sample.sequences[0].tokens)
            fb = await client.forward_backward(cfg.adapter_id, [datum], "cross_entropy")
            opt = await client.optim_step(
                cfg.adapter_id, AdamParams(learning_rate=cfg.learning_rate, grad_clip_norm=cfg.grad_clip_norm)
            )
            emit(
                adapter=cfg.adapter_id,
                step=step + 1,
                loss=fb.loss,
                sampled_version=sample.adapter_version,
                version=opt.version,
                exact=text == target,
                t=time.perf_counter() - start,
            )
        sample = await client.sample(cfg.adapter_id, prompt, n=1, params=greedy)
        text = tokenizer.decode(sample.sequences[0].tokens)
        saved = await client.save_state(cfg.adapter_id, f"{cfg.adapter_id}-final")
        emit(adapter=cfg.adapter_id, done=True, completion=text, target=target, checkpoint=saved.path)
    return 0 if text == target else 1


def main(cfg: SftAgentConfig) -> int:
    from hotlora.engine.event_loop import run

    try:
        return run(run_sft_agent(cfg))
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the parent shows this line; the traceback goes to stderr
        emit(adapter=cfg.adapter_id, error=f"{type(err).__name__}: {err}")
        raise
    finally:
        sys.stdout.flush()
