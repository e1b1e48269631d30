"""The checkpoint's tokenizer (`tokenizer.json`, read with `tokenizers`) and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer that is missing or does not fit the model."""


class Tokenizer:
    def __init__(self, path: str | Path):
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{file}: not a readable tokenizer ({exc})") from None
        config_file = folder / "tokenizer_config.json"
        self.add_bos = False
        self.bos_token_id: int | None = None
        if config_file.is_file():
            try:
                cfg = json.loads(config_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"{config_file}: not valid JSON ({exc})") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{config_file}: expected a JSON object, got {type(cfg).__name__}")
            self.add_bos = bool(cfg.get("add_bos_token", False))
            bos = cfg.get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            if bos is not None and not isinstance(bos, str):
                raise TokenizerError(f"{config_file}: field 'bos_token' must be a token string, got {bos!r}")
            self.bos_token_id = self._tok.token_to_id(bos) if bos else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. Text that ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD) is held back until the next token completes it, and so
    is a tail that could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, holdback: int = 0):
        self.tokenizer = tokenizer
        self.holdback = holdback
        self.sent = 0

    def delta(self, text: str, final: bool) -> str:
        """The part of `text` (the full decoded output so far) not sent yet."""
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            end = max(self.sent, end - self.holdback)
        out = text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
