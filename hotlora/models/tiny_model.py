"""Tiny Llama-architecture models built locally: no downloads, deterministic from a seed, cached.

``build_tiny_model`` writes an ordinary Hugging Face directory (``config.json``, safetensors,
``tokenizer.json``), so the engine loads it through ``from_pretrained`` exactly as it would load a
user's Qwen3 or Llama checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from hotlora.models.pretrain import ProgressFn, pretrain

RECIPE_FORMAT = 1
COMPLETE_MARKER = "hotlora-model.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class TinyModelRecipe:
    """Everything that determines the model's bytes; its hash is the cache key."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_positions: int = 256
    # Tied embeddings at HF's default std (0.02) cap every logit near 2.5, so a frozen random base
    # could never become confident and LoRA alone could never fit a target; 0.25 lifts that cap.
    embedding_std: float = 0.25
    seed: int = 0
    pretrain_steps: int = 0
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    pretrain_answer_noise: float = 0.0  # see agents.corpus.examples

    def cache_key(self) -> str:
        payload = json.dumps({"format": RECIPE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    return Path(os.environ.get("HOTLORA_CACHE", Path.home() / ".cache" / "hotlora")) / "models"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: every byte is a token, so digits and letters stay whole."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_model(recipe: TinyModelRecipe, vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, recipe.embedding_std)
    return model


def build_tiny_model(recipe: TinyModelRecipe, out_dir: Path, progress: ProgressFn | None = None) -> Path:
    """Build (and optionally pretrain) the model into ``out_dir``."""
    tokenizer = build_tokenizer()
    model = build_model(recipe, vocab_size=len(tokenizer))
    if recipe.pretrain_steps > 0:
        pretrain(
            model,
            tokenizer,
            steps=recipe.pretrain_steps,
            batch_size=recipe.pretrain_batch_size,
            lr=recipe.pretrain_lr,
            seed=recipe.seed,
            answer_noise=recipe.pretrain_answer_noise,
            progress=progress,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / COMPLETE_MARKER).write_text(json.dumps({"recipe": dataclasses.asdict(recipe)}, indent=2))
    return out_dir


def ensure_tiny_model(
    recipe: TinyModelRecipe, cache_root: Path | None = None, progress: ProgressFn | None = None
) -> Path:
    """The cached model for ``recipe``, built on first use; concurrent builders race safely."""
    root = cache_root or default_cache_root()
    final = root / recipe.cache_key()
    if (final / COMPLETE_MARKER).is_file():
        return final
    tmp = root / f".{recipe.cache_key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(recipe, tmp, progress)
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process finished first; its copy is identical (same recipe and seed).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / COMPLETE_MARKER).is_file():
            raise
    return final
