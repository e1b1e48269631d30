"""`ServingOptions`: the one source of serving parameters.

The Triton model reads them from the `parameters` of its config.pbtxt (`from_parameters`: every
value arrives as a string); the repository renderer (repository.py) writes them there
(`to_parameters`). Defaults live here and nowhere else.

`REPOSITORY_FORMAT` names the layout of a rendered repository: a repository rendered by an older
`tidar-export` (whose model.py imports modules that have since moved) lacks it or carries another
value, and is refused by name with the command that renders it again (`check_format`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tidar.runtime.backends.base import BACKENDS
from tidar.runtime.ngram import DEFAULT_DRAFTER, DRAFTERS

REPOSITORY_FORMAT = "2"
"""Layout version of a rendered repository (config.pbtxt parameter `repository_format`)."""
CUDA_GRAPH_SETTINGS = {"auto": None, "true": True, "false": False}
"""Values of the `cuda_graphs` parameter."""
RERENDER = ("render it again: `tidar-export build CHECKPOINT -o OUT` writes OUT/triton_repo, or "
            "`python -c \"from tidar.serving.repository import render_repository; "
            "render_repository('REPO', model_dir='MODEL')\"`")


class OptionsError(ValueError):
    """A serving parameter with a value that cannot be served; the message names it."""


@dataclass
class ServingOptions:
    """The `parameters` of the Triton model (config.pbtxt), typed."""

    model_dir: str = "."
    """Checkpoint (torch backend) or `tidar-export build` output (every backend); relative paths are
    relative to the Triton model's folder."""
    backend: str = "torch"
    """Runtime backend: torch or onnxruntime (tensorrt and trtllm on GPU hosts with those packages)."""
    draft_len: int | None = None
    """Draft length of requests that set none; "auto" (None) adapts it to the batch size."""
    drafter: str = DEFAULT_DRAFTER
    """Where proposals come from (docs/design.md §3.9): tidar (TiDAR's block), hybrid (the default:
    TiDAR's block or an n-gram continuation of the prompt and output, whichever is expected to
    commit more) or ngram (the continuation whenever one matches). Output is the same with each."""
    verify_only: bool = True
    """With draft_len auto and a drafter that proposes n-grams (hybrid, ngram): weigh verify-only
    steps at every step, which check the rows' n-gram continuations without drafting
    (docs/design.md §3.10); false: the policy's shape alone."""
    max_batch_size: int = 16
    """Most requests decoded together in one step."""
    max_queue_size: int = 64
    """Most requests waiting for a row; more are refused as overloaded."""
    max_tokens_limit: int = 0
    """Largest accepted `max_tokens`; 0 = the model's max_position_embeddings."""
    default_timeout: float | None = None
    """Seconds before a request ends with finish reason "timeout" ("" or 0 = none)."""
    autotune_batch_sizes: tuple[int, ...] = (1, 4, 16)
    """Batch sizes whose step latency is measured at start-up (the draft-length policy's table)."""
    autotune_draft_lens: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Candidate draft lengths of the adaptive batch."""
    autotune_draft_blocks: tuple[int, ...] = (1, 2)
    """Block counts k tried below k = b for each candidate draft length (`autotune.draft_shapes`;
    empty: k = b only)."""
    autotune_repeats: int = 3
    """Least timed rounds of each candidate step at start-up before the race drops any
    (runtime/autotune.py `race`)."""
    autotune_budget: float = 60.0
    """Seconds the start-up measurement may take (the acceptance estimate when the model has no
    acceptance.json, then the race of step latencies): larger models get fewer candidates and
    batch sizes measured, not a later start."""
    threads: int = 0
    """torch / ONNX Runtime intra-op threads; 0 = half the CPUs (`requests.default_threads`)."""
    attention: str = "sdpa"
    """Attention of the torch backend (eager, sdpa, flex, triton on CUDA); ignored by the others."""
    dtype: str | None = None
    """Compute dtype of the torch backend (float32, bfloat16, float16); empty = the checkpoint's."""
    cuda_graphs: bool | None = None
    """Decode steps of the torch backend as CUDA graphs: "auto" (None: on for a KIND_GPU instance with
    eager, sdpa or triton attention), "true" (an error on KIND_CPU) or "false"; ignored by the others."""
    repository_format: str = REPOSITORY_FORMAT
    """Layout version of the repository these options were rendered into (see REPOSITORY_FORMAT)."""

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "ServingOptions":
        """Options from config.pbtxt's parameters (strings); a ValueError names a bad one."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise OptionsError(f"config.pbtxt: unknown parameter(s) {unknown}; known: {', '.join(fields)}")
        values = {}
        for name, raw in params.items():
            raw = raw.strip()
            try:
                values[name] = _parse(name, raw)
            except (ValueError, KeyError):
                raise OptionsError(f"config.pbtxt: parameter '{name}' has an invalid value {raw!r}") from None
        options = cls(**values)
        options.validate()
        return options

    @classmethod
    def from_values(cls, **values) -> "ServingOptions":
        """Options from Python values; strings are parsed as config.pbtxt's would be."""
        parsed = {}
        for name, value in values.items():
            if name not in cls.__dataclass_fields__:
                raise OptionsError(f"unknown serving option {name!r}; known: {', '.join(cls.__dataclass_fields__)}")
            try:
                parsed[name] = _parse(name, value.strip()) if isinstance(value, str) else value
            except (ValueError, KeyError):
                raise OptionsError(f"serving option '{name}' has an invalid value {value!r}") from None
        options = cls(**parsed)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise OptionsError naming the first option that cannot be served."""
        if self.backend not in BACKENDS:
            raise OptionsError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.draft_len is not None and (not isinstance(self.draft_len, int) or self.draft_len < 0):
            raise OptionsError(f"draft_len must be 'auto' or a non-negative integer, got {self.draft_len!r}")
        if self.drafter not in DRAFTERS:
            raise OptionsError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        if not isinstance(self.verify_only, bool):
            raise OptionsError(f"verify_only must be true or false, got {self.verify_only!r}")
        for name in ("max_batch_size", "autotune_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionsError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_queue_size", "max_tokens_limit", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OptionsError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.autotune_budget, bool) or not isinstance(self.autotune_budget, (int, float)) \
                or not 0 < self.autotune_budget < float("inf"):
            raise OptionsError(f"autotune_budget must be a positive number of seconds, got {self.autotune_budget!r}")
        if '"' in str(self.model_dir) or "\n" in str(self.model_dir):
            raise OptionsError(f"model_dir {self.model_dir!r} cannot be written into config.pbtxt")

    def check_format(self, where: str) -> None:
        """Refuse options read from a repository of another layout version, naming `where`."""
        if self.repository_format != REPOSITORY_FORMAT:
            raise OptionsError(f"{where}: a repository rendered by an older tidar-export (format "
                               f"{self.repository_format or 'unnamed'}, this version serves format "
                               f"{REPOSITORY_FORMAT}); {RERENDER}")

    def to_parameters(self) -> dict[str, str]:
        """The options as config.pbtxt parameters (strings that `from_parameters` reads back)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "cuda_graphs":
                out[field.name] = {None: "auto", True: "true", False: "false"}[value]
            elif field.name == "verify_only":
                out[field.name] = "true" if value else "false"
            elif field.name == "draft_len":
                out[field.name] = "auto" if value is None else str(value)
            elif isinstance(value, tuple):
                out[field.name] = ",".join(str(v) for v in value)
            elif value is None:
                out[field.name] = ""
            elif field.name == "default_timeout":
                out[field.name] = f"{value:g}"
            else:
                out[field.name] = str(value)
        return out


def _parse(name: str, raw: str):
    """The typed value of option `name` from its config.pbtxt string (ValueError/KeyError if bad)."""
    if name in ("max_batch_size", "max_queue_size", "max_tokens_limit", "autotune_repeats", "threads"):
        return int(raw)
    if name == "draft_len":
        return None if raw in ("", "auto") else int(raw)
    if name == "autotune_budget":
        return float(raw)
    if name == "default_timeout":
        return float(raw) if raw not in ("", "0", "none") else None
    if name.startswith("autotune_") and name.endswith("s"):
        return tuple(int(v) for v in raw.split(",") if v.strip())
    if name == "dtype":
        return raw or None
    if name == "verify_only":
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[raw.lower()]
    if name == "cuda_graphs":
        return CUDA_GRAPH_SETTINGS[raw.lower() or "auto"]
    return raw
