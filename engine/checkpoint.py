"""Adapter checkpoints: PEFT format for the weights, plus the full training state beside it.

Layout of a state directory::

    adapter_config.json           PEFT's LoraConfig        (peft.PeftModel.from_pretrained loads these two)
    adapter_model.safetensors     lora_A / lora_B weights
    training_state.json           version, spec, last AdamParams
    training_state.safetensors    AdamW moments and step per tensor, the adapter's RNG state

safetensors and JSON only: nothing is pickled, so a checkpoint from an untrusted tenant is data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hotlora.engine.types import AdamParams, LoraSpec
from hotlora.schemas.errors import CheckpointError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "hotlora-training-state"
STATE_FORMAT_VERSION = 1


def peft_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.lora_{which}.weight"


@dataclass
class LoadedAdapter:
    """What a checkpoint directory holds, before it is bound to a slot."""

    spec: LoraSpec
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A, B)
    version: int = 0
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None  # peft key -> moments
    rng_state: torch.Tensor | None = None
    adam_params: AdamParams | None = None


def _atomic_dir(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, path: Path) -> None:
    if path.is_symlink() or path.exists():
        # Replace an earlier checkpoint or an empty directory, never anything else: a save to a parent
        # directory (or a stray file) must not wipe other checkpoints that live below it.
        if path.is_symlink() or not path.is_dir() or not ((path / CONFIG_FILE).is_file() or not any(path.iterdir())):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{path} exists and is not a checkpoint directory; refusing to replace it")
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_peft(
    tmp: Path, spec: LoraSpec, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], base_path: str
) -> None:
    from peft import LoraConfig  # here, not at the top: importing peft costs every engine start 0.1-0.4 s

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=sorted(spec.target_modules()),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )
    config.save_pretrained(str(tmp))
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in weights.items():
        tensors[peft_key(name, "A")] = a.detach().to("cpu").contiguous()
        tensors[peft_key(name, "B")] = b.detach().to("cpu").contiguous()
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})


def save_checkpoint(
    path: str | Path, adapter_id: str, loaded: LoadedAdapter, base_path: str, include_state: bool = True
) -> Path:
    """Write PEFT weights and (``include_state``) the training state, atomically: readers never see half."""
    path = Path(path)
    tmp = _atomic_dir(path)
    write_peft(tmp, loaded.spec, loaded.weights, base_path)
    if not include_state:
        _commit_dir(tmp, path)
        return path
    tensors: dict[str, torch.Tensor] = {}
    for key, (exp_avg, exp_avg_sq, step) in (loaded.moments or {}).items():
        tensors[f"{key}.exp_avg"] = exp_avg.detach().to("cpu").contiguous()
        tensors[f"{key}.exp_avg_sq"] = exp_avg_sq.detach().to("cpu").contiguous()
        tensors[f"{key}.step"] = torch.tensor(step, dtype=torch.float64)
    if loaded.rng_state is not None:
        tensors["rng_state"] = loaded.rng_state.clone()
    save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "adapter_id": adapter_id,
        "version": loaded.version,
        "spec": {
            "rank": loaded.spec.rank,
            "alpha": loaded.spec.alpha,
            "targets": loaded.spec.targets if isinstance(loaded.spec.targets, str) else list(loaded.spec.targets),
            "seed": loaded.spec.seed,
        },
        "adam_params": dataclasses.asdict(loaded.adam_params) if loaded.adam_params else None,
        "has_moments": loaded.moments is not None,
    }
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, sort_keys=True))
    _commit_dir(tmp, path)
    return path


def _read_peft_config(path: Path) -> tuple[int, float, tuple[str, ...]]:
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {err}") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path} holds a {raw.get('peft_type')} adapter; only LORA is supported")
    unsupported = [
        key
        for key in ("use_dora", "use_rslora", "layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save")
        if raw.get(key)
    ]
    if raw.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise CheckpointError(f"{path}: PEFT options {unsupported} are not supported by hotlora")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{path}: target_modules must be a non-empty list of module names, got {targets!r}")
    return int(raw["r"]), float(raw["lora_alpha"]), tuple(sorted(targets))


def load_checkpoint(path: str | Path) -> LoadedAdapter:
    """Read a PEFT adapter directory, with hotlora's training state when present."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    rank, alpha, targets = _read_peft_config(path)
    spec = LoraSpec(rank=rank, alpha=alpha, targets=targets)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}") from None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise CheckpointError(f"{path}: {key} has no matching lora_B")
        weights[module] = (a, tensors[b_key])
    if not weights:
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
    loaded = LoadedAdapter(spec=spec, weights=weights)
    state_json = path / STATE_JSON
    if not state_json.is_file():
        return loaded
    state = json.loads(state_json.read_text())
    if state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{state_json}: unknown training-state format {state.get('format_version')!r}")
    raw_spec = state["spec"]
    targets_raw = raw_spec["targets"]
    loaded.spec = LoraSpec(
        rank=int(raw_spec["rank"]),
        alpha=float(raw_spec["alpha"]),
        targets=targets_raw if isinstance(targets_raw, str) else tuple(targets_raw),
        seed=int(raw_spec["seed"]),
    )
    if (loaded.spec.rank, loaded.spec.alpha, tuple(sorted(loaded.spec.target_modules()))) != (rank, alpha, targets):
        raise CheckpointError(f"{path}: {STATE_JSON} and {CONFIG_FILE} disagree on rank, alpha or targets")
    loaded.version = int(state["version"])
    loaded.adam_params = AdamParams(**state["adam_params"]) if state.get("adam_params") else None
    extra = load_file(str(path / STATE_TENSORS))
    loaded.rng_state = extra.get("rng_state")
    if state.get("has_moments"):
        loaded.moments = {}
        for name in weights:
            for which in ("A", "B"):
                key = peft_key(name, which)
                try:
                    loaded.moments[key] = (
                        extra[f"{key}.exp_avg"],
                        extra[f"{key}.exp_avg_sq"],
                        float(extra[f"{key}.step"]),
                    )
                except KeyError as err:
                    raise CheckpointError(f"{path}: optimizer state lacks {err.args[0]}") from None
    return loaded
