"""A checkpoint's generation_config.json: its end ids and its sampling defaults.

    defaults = GenerationDefaults.from_folder(folder)     # no file: no defaults
    Request(prompt_ids, n, sampling, eos_ids=defaults.eos_ids)
    values = defaults.apply({"temperature": None, "top_k": 5, "top_p": None})
    params = defaults.apply(params, explicitly_set={"temperature"})

The rule (docs/design.md §1.1), the one vLLM applies by default
(`--generation-config auto`):

- **End ids.** `eos_token_id` (an id or a list) ends generation on any of its ids, in place of
  config.json's `eos_token_id`; without it config.json's ids apply.
- **Sampling defaults.** `temperature`, `top_k` and `top_p` fill the parameters a request leaves
  unset; a parameter the request sets wins, so an explicit temperature 0 is greedy whatever the
  checkpoint says. One difference from vLLM: `do_sample: false` makes the default temperature 0
  (greedy), as `transformers`' `generate` reads it; vLLM ignores `do_sample`.

Every value is checked; an error names the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")
"""The sampling parameters a checkpoint's generation_config.json supplies defaults for."""


class GenerationConfigError(ValueError):
    """A generation_config.json that cannot be read or holds a bad value; the message names the
    file and the field."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint's generation_config.json asks of generation."""

    eos_token_ids: tuple[int, ...] = ()
    """The end ids it lists (empty: it lists none, config.json's apply)."""
    sampling: Mapping[str, float | int] = field(default_factory=dict)
    """Defaults of the SAMPLING_FIELDS it gives (only those it gives)."""
    source: str = ""
    """The file they were read from ("" when there is none)."""

    # ----------------------------------------------------------------- reading
    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationDefaults":
        """The defaults of the checkpoint or export `folder` (none when it has no
        generation_config.json)."""
        path = Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GenerationConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = GENERATION_CONFIG) -> "GenerationDefaults":
        """Validate a parsed generation_config.json; `source` names it in error messages."""
        if not isinstance(raw, dict):
            raise GenerationConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        for token in eos_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise GenerationConfigError(f"{source}: field 'eos_token_id' must be a token id or a list of "
                                            f"them, got {eos!r}")
        sampling: dict[str, float | int] = {}
        temperature = raw.get("temperature")
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                    or not math.isfinite(temperature) or temperature < 0:
                raise GenerationConfigError(f"{source}: field 'temperature' must be a finite number >= 0, "
                                            f"got {temperature!r}")
            sampling["temperature"] = float(temperature)
        top_k = raw.get("top_k")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
                raise GenerationConfigError(f"{source}: field 'top_k' must be an integer >= 0, got {top_k!r}")
            sampling["top_k"] = top_k
        top_p = raw.get("top_p")
        if top_p is not None:
            if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
                raise GenerationConfigError(f"{source}: field 'top_p' must be in (0, 1], got {top_p!r}")
            sampling["top_p"] = float(top_p)
        do_sample = raw.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise GenerationConfigError(f"{source}: field 'do_sample' must be true or false, got {do_sample!r}")
        if do_sample is False:
            sampling["temperature"] = 0.0  # transformers' generate: greedy, whatever temperature says
        return cls(tuple(dict.fromkeys(eos_ids)), sampling, source)

    # ----------------------------------------------------------------- using
    @property
    def eos_ids(self) -> tuple[int, ...] | None:
        """The end ids a `Request` gets: generation_config.json's, or None (= the model's
        config.json ids) when it lists none."""
        return self.eos_token_ids or None

    def apply(self, params, explicitly_set: Iterable[str] | None = None):
        """`params` with every sampling parameter the caller left unset taken from the checkpoint's
        defaults, of the same type:

        - a dict {name: value or None}: a parameter is unset when it is missing or None (unless
          `explicitly_set` is given, which then decides); the result holds every default given;
        - a `SamplingParams`: `explicitly_set` (required) names the parameters the caller set; the
          others take the checkpoint's default where it has one.

        A parameter the caller set always wins (temperature 0 stays greedy)."""
        if isinstance(params, SamplingParams):
            if explicitly_set is None:
                raise TypeError("apply(SamplingParams, explicitly_set): name the parameters the caller set "
                                "(a SamplingParams cannot tell a default from a value that was set)")
            chosen = set(explicitly_set)
            return dataclasses.replace(params, **{name: value for name, value in self.sampling.items()
                                                  if name not in chosen})
        if not isinstance(params, Mapping):
            raise TypeError(f"apply() takes a SamplingParams or a dict, got {type(params).__name__}")
        chosen = ({name for name, value in params.items() if value is not None} if explicitly_set is None
                  else set(explicitly_set))
        values = dict(params)
        for name, value in self.sampling.items():
            if name not in chosen:
                values[name] = value
        return values
