"""The agents' tokenizer: a model directory's ``tokenizer.json`` through the ``tokenizers`` library.

An agent only encodes prompts and decodes completions. transformers' ``AutoTokenizer`` would do the
same work on the same ``tokenizer.json`` (a fast tokenizer is this library underneath) at the price
of importing transformers; reading the file directly gives the same ids (``tests/test_tasks.py``
checks them against ``AutoTokenizer``) and keeps ``hotlora.agents`` light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# What transformers' ``clean_up_tokenization`` undoes when a tokenizer_config.json asks for it.
_CLEAN_UP = (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")
_CLEAN_UP += (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")


@dataclass(frozen=True)
class TextTokenizer:
    """``encode`` (no special tokens added) and ``decode`` (special tokens skipped), as the engine's model sees text."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    clean_up_spaces: bool = False

    @classmethod
    def from_model_dir(cls, path: str | Path) -> TextTokenizer:
        directory = Path(path)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_file = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def special(name: str) -> int | None:
            token = config.get(name)
            content = token.get("content") if isinstance(token, dict) else token
            return None if content is None else tokenizer.token_to_id(content)

        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        return cls(tokenizer, special("bos_token"), special("eos_token"), clean_up)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.clean_up_spaces:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def with_bos(self, text: str) -> list[int]:
        """``<bos> text``: how the tiny models were pretrained to see a prompt (no BOS if the model has none)."""
        return [*([] if self.bos_token_id is None else [self.bos_token_id]), *self.encode(text)]
