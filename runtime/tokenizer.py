"""The checkpoint's tokenizer (`tokenizer.json`, read with `tokenizers`) and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; the BOS token first when the tokenizer adds one, unless
        `add_special_tokens` is False (words to match inside a sequence, e.g. bad words)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """The text of one growing output, token by token, at a cost per token independent of the
    output's length (`tokenizers`' DecodeStream), with stop strings searched only in the new
    tail. `delta` hands out the text not sent yet, holding back an incomplete UTF-8 sequence
    (U+FFFD) and a tail that could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self._stream = DecodeStream(skip_special_tokens=True)
        self._recent: list[int] = []  # the last few ids, for `flush`
        self._pending = 0  # ids fed since the stream last produced text

    def add(self, token_id: int) -> bool:
        """Append one token's text; True if that completed a stop string (the text is then cut
        before it)."""
        chunk = self._stream.step(self.tokenizer._tok, token_id)
        self._recent = (self._recent + [token_id])[-max(8, self._pending + 1):]
        self._pending = 0 if chunk else self._pending + 1
        return self._append(chunk) if chunk else False

    def flush(self) -> bool:
        """At the end of the output: the text of ids still waiting to complete a character (an
        incomplete UTF-8 sequence decodes to U+FFFD, as a full decode gives it), decoded with a
        few ids before them as context. True if that completed a stop string."""
        if not self._pending:
            return False
        context, pending = self._recent[:-self._pending], self._recent[-self._pending:]
        self._pending = 0
        before, after = self.tokenizer.decode(context), self.tokenizer.decode(context + pending)
        return self._append(after[len(before):] if after.startswith(before) else after)

    def _append(self, chunk: str) -> bool:
        start = max(0, len(self.text) - self.holdback)  # a stop string may begin in the last holdback chars
        self.text += chunk
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def delta(self, final: bool) -> str:
        """The part of the text not sent yet."""
        text = self.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            end = max(self.sent, end - self.holdback)
        out = text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
