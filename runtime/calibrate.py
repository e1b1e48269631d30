"""Calibration of a checkpoint for the draft-shape autotuner: its acceptance and the replayed
tokens per step of every trained shape (b, k), measured by greedy replay (runtime/replay.py) on
a prompt set and written to acceptance.json beside the model (docs/design.md §3.4).

    tidar calibrate MODEL [--prompts default|heldout|FILE] [-o MODEL/acceptance.json]

Prompt sets: `default`, the prompts below that ship with the project (code, prose and
instructions); `heldout`, prompts cut from the held-out files of the training split in the
model's train_config.json (the standard library's source for the bundled model; what `tidar
bench` measures on); or the user's own file: a JSON list of strings, or JSON Lines of strings or
of objects with a "prompt" (or "text") field.

Without acceptance.json a server or `tidar generate --draft-len auto` estimates both at start-up
(`startup_estimate`): the same replay on a few generic prompts, as far as a time budget goes.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import autotune, replay
from .backends.base import Backend

DEFAULT_PROMPTS = (
    "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items, or -1.\"\"\"\n",
    "import json\nfrom pathlib import Path\n\n\ndef load_settings(path):\n",
    "class LRUCache:\n    def __init__(self, capacity: int):\n        self.capacity = capacity\n",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "SELECT name, COUNT(*) AS orders\nFROM customers\nJOIN orders ON",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n",
    "The water cycle describes how water moves between the oceans, the air and the land. First,",
    "Dear team,\n\nThank you all for your work on the release last week. Before we plan the next one,",
    "Q: What is the difference between a list and a tuple in Python?\nA:",
    "Write a short summary of the causes of the French Revolution.\n\n",
    "Step-by-step instructions to replace a bicycle tire:\n1.",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
)
"""The prompt set that ships with the project (`--prompts default`)."""
GENERIC_PROMPTS = ("import os\n", "def main():\n    ", "class Config:\n    def __init__(self", "# ", "for i in range(")
"""The start-up estimate's prompts (`startup_estimate`)."""
STARTUP_NEW_TOKENS = 32
"""Tokens replayed per prompt by the start-up estimate."""


class CalibrationError(ValueError):
    """A prompt set that cannot be used; the message names the file or the value."""


def heldout_prompts(model: Path, tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:
    """Token prompts from the held-out side of the model's training split (stdlib by default),
    each file cut at a line start a third of the way in."""
    from tidar.train.data import expand_globs, split_files

    model = Path(model)
    settings = json.loads((model / "train_config.json").read_text()) if (model / "train_config.json").is_file() \
        else {"files": ["stdlib"], "heldout_percent": 5.0}
    _, heldout = split_files(expand_globs(settings["files"]), settings["heldout_percent"])
    prompts = []
    for path in heldout:
        text = path.read_text(encoding="utf-8", errors="replace")
        start = text.find("\n", len(text) // 3) + 1
        ids = tokenizer.encode(text[start:])[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a user's file: a JSON list of strings, or JSON Lines of strings or of
    objects with "prompt" or "text". Raises CalibrationError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such prompt file")
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        items = [(i + 1, item) for i, item in enumerate(whole)]
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise CalibrationError(f"{path}: line {number} is not JSON ({error.msg}); a prompt file is a "
                                           "JSON list of strings or JSON Lines") from None
    prompts = []
    for number, item in items:
        if isinstance(item, dict):
            item = item.get("prompt", item.get("text"))
        if not isinstance(item, str) or not item:
            raise CalibrationError(f"{path}: entry {number} is not a non-empty string or an object with a "
                                   "\"prompt\" string")
        prompts.append(item)
    if not prompts:
        raise CalibrationError(f"{path}: no prompts")
    return prompts


def prompt_ids(spec: str, model: Path, tokenizer, count: int | None = None,
               heldout_tokens: int = 64) -> list[list[int]]:
    """Token prompts of the set `spec` ("default", "heldout" or a file), at most `count`."""
    if spec == "heldout":
        ids = heldout_prompts(model, tokenizer, count or 8, heldout_tokens)
        if not ids:
            raise CalibrationError(f"{model}: no held-out prompt of {heldout_tokens} tokens in its training split")
        return ids
    texts = list(DEFAULT_PROMPTS) if spec == "default" else read_prompt_file(spec)
    ids = [tokenizer.encode(text) for text in texts[:count]]
    empty = [text for text, tokens in zip(texts, ids) if not tokens]
    if empty:
        raise CalibrationError(f"prompt {empty[0]!r} encodes to no tokens")
    return ids


@dataclass
class Calibration:
    """What a replay measured, summed over its prompts."""

    block_size: int
    draft_lens: tuple[int, ...]
    max_new_tokens: int
    counts: dict = field(default_factory=dict)
    """{(b, k): replay.ReplayCounts}."""
    seconds: float = 0.0

    @property
    def prompts(self) -> int:
        return max((c.prompts for c in self.counts.values()), default=0)

    @property
    def acceptance(self) -> list[float]:
        """P(d_1..d_i all accepted), i = 1..block_size-1, at the largest draft length with k = b
        (positions beyond it: 0)."""
        b = max(self.draft_lens)
        rates = self.counts[(b, b)].acceptance if (b, b) in self.counts else []
        return (list(rates) + [0.0] * self.block_size)[: self.block_size - 1]

    @property
    def replayed(self) -> dict[str, float]:
        return replay.replayed_tokens_per_step(self.counts)

    def to_json(self, measured_by: str, **extra) -> dict:
        """The content of acceptance.json (`autotune.load_acceptance` / `load_replayed` read it)."""
        return {"block_size": self.block_size, "acceptance": self.acceptance, "prompts": self.prompts,
                "max_new_tokens": self.max_new_tokens, "draft_lens": list(self.draft_lens),
                autotune.REPLAY_FIELD: self.replayed, "measured_by": measured_by,
                "date": datetime.date.today().isoformat(), "seconds": round(self.seconds, 1), **extra}


def calibrate(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
              draft_lens: Sequence[int] | None = None, budget_s: float | None = None,
              progress: Callable[[Iterable], Iterable] | None = None) -> Calibration:
    """Greedy replay of `prompts` (token ids), one at a time, at every shape (b, k), k = 1..b,
    of the draft lengths `draft_lens` (default: the trained ones, `autotune.trained_draft_lens`),
    `max_new_tokens` each. `budget_s`: no new prompt starts after it (at least one runs).
    `progress` wraps the prompt loop (e.g. tqdm)."""
    config = backend.config
    lens = tuple(sorted(set(draft_lens or autotune.trained_draft_lens(config))))
    trained = autotune.trained_draft_lens(config)
    untrained = [b for b in lens if b not in trained]
    if untrained:
        raise CalibrationError(f"draft length {untrained[0]} is not one the checkpoint was trained with "
                               f"({', '.join(map(str, trained))})")
    shapes = autotune.draft_shapes(lens, range(1, max(lens) + 1))
    result = Calibration(config.block_size, lens, max_new_tokens)
    started = time.perf_counter()
    for prompt in (progress or iter)(list(prompts)):
        if result.counts and budget_s is not None and time.perf_counter() - started >= budget_s:
            break
        for shape, counts in replay.replay(backend, [prompt], max_new_tokens, shapes).items():
            if shape in result.counts:
                result.counts[shape].add(counts)
            else:
                result.counts[shape] = counts
    result.seconds = time.perf_counter() - started
    return result


def write_acceptance(path: str | Path, calibration: Calibration, measured_by: str, **extra) -> Path:
    """Write `calibration` as acceptance.json to `path` (a folder: path/acceptance.json),
    atomically (a reader never sees half a file)."""
    path = Path(path)
    if path.is_dir():
        path = path / autotune.ACCEPTANCE_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(calibration.to_json(measured_by, **extra), indent=2) + "\n")
    partial.replace(path)
    return path


def startup_estimate(backend: Backend, tokenizer, folder: str | Path, budget_s: float | None = None,
                     draft_lens: Sequence[int] | None = None) -> tuple[list[float], dict | None, str]:
    """(acceptance, replayed tokens per step or None, a sentence saying which estimate it is) of
    the model in `folder`: its acceptance.json when it has one for this block size, else a
    greedy replay of GENERIC_PROMPTS (STARTUP_NEW_TOKENS each, prompts one at a time until
    `budget_s`) at `draft_lens` (default: the trained ones)."""
    block = backend.config.block_size
    acceptance = autotune.load_acceptance(folder, block)
    if acceptance is not None:
        replayed = autotune.load_replayed(folder, block)
        data = json.loads((Path(folder) / autotune.ACCEPTANCE_FILE).read_text())
        source = f"{data.get('measured_by', 'unnamed')}, {data.get('date', 'undated')}, {data.get('prompts', '?')} prompts"
        kind = "replayed tokens per step" if replayed else "the Markov estimate from its acceptance (no replay)"
        return acceptance, replayed, f"{autotune.ACCEPTANCE_FILE} ({source}): {kind}"
    ids = [tokenizer.encode(p) for p in GENERIC_PROMPTS]
    lens = [b for b in (draft_lens or autotune.trained_draft_lens(backend.config))
            if b in autotune.trained_draft_lens(backend.config)] or None
    result = calibrate(backend, ids, STARTUP_NEW_TOKENS, lens, budget_s)
    return result.acceptance, result.replayed, (
        f"no {autotune.ACCEPTANCE_FILE} in {folder}: a start-up estimate, greedy replay of {result.prompts} generic "
        f"prompt(s) x {STARTUP_NEW_TOKENS} tokens ({result.seconds:.1f} s); `tidar calibrate` measures it on a "
        "prompt set")
