"""Loading the frozen base: any Hugging Face causal LM, through ``from_pretrained``.

A user's Qwen3 or Llama checkpoint and the tiny test model take exactly the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from hotlora.engine.types import is_int
from hotlora.schemas.errors import InvalidRequest

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (exact tests, no slow bf16 kernels) and bf16 on GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequest(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def prepare_device(device: torch.device) -> None:
    """Process-wide settings for the device the base runs on; idempotent, called when the base loads.

    On CUDA, fp32 matmuls may use TF32 tensor cores (10-bit mantissa, fp32 range, several times IEEE
    fp32's speed): an fp32 base (``dtype="float32"``) and any fp32 math beside a bf16 base run that much
    faster, at a precision still above the bf16 activations around them. CUDA only, and through the
    legacy ``allow_tf32`` flag on purpose: the global ``set_float32_matmul_precision("high")`` also lets
    oneDNN round CPU fp32 matmuls (the CPU tests need exact fp32), and setting the per-backend
    ``fp32_precision`` makes torch 2.13 refuse ``torch.get_float32_matmul_precision()``, which libraries call.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token id that ends a sample: the tokenizer's EOS and the generation config's (often a
        list: Qwen and Llama 3 chat models end turns on several), so clients and samplers agree."""
        ids: set[int] = set()
        sources = [self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)]
        for source in sources:
            if is_int(source):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(i for i in source if is_int(i))
        return frozenset(ids)

    @property
    def name(self) -> str:
        return model_name(self.path)


def model_name(path: str | Path) -> str:
    """The name a client sees for the base at ``path``: the Hub repo id when ``path`` lies in a Hugging
    Face cache (``.../models--Qwen--Qwen3-8B/snapshots/<revision>`` is ``Qwen/Qwen3-8B``), else the
    directory's own name. A directory path alone says where the model is on one host, not which model."""
    absolute = Path(path).absolute()
    for part in reversed(absolute.parts):
        if part.startswith("models--") and len(part) > len("models--"):
            return part.removeprefix("models--").replace("--", "/", 1)
    return absolute.name


def load_base_model(path: str | Path, dtype: str = "auto", device: str = "auto") -> BaseModel:
    """Load, freeze and put in eval mode (no dropout: training noise belongs to the adapters)."""
    path = str(path)
    if not Path(path, "config.json").is_file():
        raise InvalidRequest(f"{path!r} is not a Hugging Face model directory (no config.json)")
    hf_logging.disable_progress_bar()  # an engine's logs are structured, not progress bars
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    prepare_device(torch_device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return BaseModel(model=model, tokenizer=tokenizer, path=path, device=torch_device, dtype=torch_dtype)
