"""Random-init models of real configurations, built locally: GPU numbers at the shapes users run.

Nothing can be downloaded here, and a benchmark of a 4B model needs the weights' *shapes*, not their
values: compute, memory and kernel counts depend only on the configuration. Each ``ModelShape`` copies
the architecture fields of a published ``config.json`` (cited in ``source``), and ``write_shape`` saves
a random-init model of it with the engine's byte-level tokenizer, padded with filler tokens to the
shape's vocabulary so that every id a random model samples decodes to text (``<12345>``). The result is
an ordinary Hugging Face directory that the engine loads through ``from_pretrained``, exactly as it
would load the real checkpoint.

Filler tokens are unreachable when encoding (no merges lead to them), so prompts tokenize byte by byte
as on the tiny models; only sampled ids use them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen3Config

from hotlora.models.tiny_model import COMPLETE_MARKER, SPECIAL_TOKENS
from hotlora.schemas.errors import InvalidRequest

SHAPE_FORMAT = 1


@dataclass(frozen=True)
class ModelShape:
    """The architecture fields of one published model configuration."""

    name: str
    architecture: str  # "qwen3" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    source: str  # where the numbers come from
    rope_scaling: dict[str, float | int | str] | None = None

    def with_overrides(self, layers: int | None = None, vocab: int | None = None) -> ModelShape:
        """A shallower or smaller-vocabulary variant (e.g. hidden 1024 with 4 layers for a CPU bench)."""
        if layers is not None and layers < 1:
            raise InvalidRequest(f"--layers must be >= 1, got {layers}")
        if vocab is not None and vocab < MIN_VOCAB:
            raise InvalidRequest(f"--vocab must be >= {MIN_VOCAB} (the byte tokenizer's size), got {vocab}")
        changes: dict[str, int] = {}
        if layers is not None:
            changes["num_layers"] = layers
        if vocab is not None:
            changes["vocab_size"] = vocab
        return dataclasses.replace(self, **changes) if changes else self

    def config(self) -> PretrainedConfig:
        """The transformers config, with the engine tokenizer's special ids (pad 0, bos 1, eos 2)."""
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            attention_bias=False,
            hidden_act="silu",
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        rope: dict[str, float | int | str] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        if self.architecture == "qwen3":
            return Qwen3Config(**common, rope_parameters=rope)
        if self.architecture == "llama":
            return LlamaConfig(**common, rope_parameters=rope)
        raise InvalidRequest(f"unknown architecture {self.architecture!r}")

    def parameters(self) -> int:
        """Parameter count of the base (what its bf16 weights cost: 2 bytes each)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.architecture == "qwen3" else 0)
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + self.hidden_size


MIN_VOCAB = len(SPECIAL_TOKENS) + 256

SHAPES: dict[str, ModelShape] = {
    # A tiny Qwen3 (q/k norms, head_dim decoupled from hidden): the same code paths as the real shapes,
    # small enough for CPU rehearsals of the GPU scripts.
    "tiny": ModelShape(
        name="tiny",
        architecture="qwen3",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_positions=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        source="hotlora's own rehearsal shape (Qwen3 architecture, tiny)",
    ),
    "qwen3-0.6b": ModelShape(
        name="qwen3-0.6b",
        architecture="qwen3",
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        max_positions=40_960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        source="https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json",
    ),
    "qwen3-4b": ModelShape(
        name="qwen3-4b",
        architecture="qwen3",
        vocab_size=151_936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_positions=40_960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        source="https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json",
    ),
    "llama-3.2-1b": ModelShape(
        name="llama-3.2-1b",
        architecture="llama",
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        max_positions=131_072,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        source="https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


def get_shape(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}") from None


def filler_token(token_id: int) -> str:
    """The text of a filler id: ASCII only, so the byte-level decoder gives it back unchanged."""
    return f"<{token_id}>"


def build_shape_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The engine's byte-level tokenizer, padded with unreachable filler tokens to ``vocab_size`` ids."""
    if vocab_size < MIN_VOCAB:
        raise InvalidRequest(f"vocab_size must be >= {MIN_VOCAB}, got {vocab_size}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for token_id in range(len(vocab), vocab_size):
        vocab[filler_token(token_id)] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_shape_model(
    shape: ModelShape, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0
) -> PreTrainedModel:
    """A random-init model of ``shape`` (Hugging Face's own initialisation), built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    config = shape.config()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def write_shape(
    shape: ModelShape,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Path:
    """Save a random-init model of ``shape`` and its tokenizer into ``out_dir`` (a Hugging Face directory)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = build_shape_model(shape, dtype, device, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_shape_tokenizer(shape.vocab_size).save_pretrained(out_dir)
    marker = {"format": SHAPE_FORMAT, "shape": dataclasses.asdict(shape), "seed": seed, "dtype": str(dtype)}
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
    del model
    return out_dir
