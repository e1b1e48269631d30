"""Seeded requests under concurrent load on the real server.

Starts `tritonserver` on the bundled model (torch backend, adaptive draft length, so the draft
length changes with the batch), sends REQUESTS requests at concurrency 16: GROUPS seeded sampled
requests, each sent REPEATS times, shuffled among greedy and unseeded requests of other lengths.
Reports, per seeded group, how many distinct answers came back and whether the answer equals the
same request sent alone in AR mode; writes JSON.

    python benchmarks/seeded_under_load.py --out RESULT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tidar import BUNDLED_MODEL
from tidar.serving.client import request
from tidar.serving.repository import render_repository
from tidar.serving.serve import TritonServer

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Config:\n    def __init__(self", "# Copyright",
           "for key, value in", "    return self.", "if __name__ == '__main__':\n", "try:\n    import",
           "self.assertEqual(", "from collections import", "x = [", "while True:\n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shuffle = random.Random(0)
    seeded = [(PROMPTS[g % len(PROMPTS)], args.max_tokens,
               dict(temperature=(0.8, 1.0)[g % 2], top_p=(1.0, 0.9, 0.95)[g % 3], random_seed=1000 + g))
              for g in range(args.groups)]
    others = [(PROMPTS[i % len(PROMPTS)], 8 + (7 * i) % 56, dict(temperature=0.9) if i % 2 else {})
              for i in range(args.requests - args.groups * args.repeats)]
    load = [(g, item) for g, item in enumerate(seeded) for _ in range(args.repeats)] + [(None, o) for o in others]
    shuffle.shuffle(load)
    with tempfile.TemporaryDirectory() as root:
        repo = render_repository(Path(root) / "repo", model_dir=str(BUNDLED_MODEL), backend="torch",
                                 dtype="float32", attention="eager", threads=2, autotune_batch_sizes="1,4,16",
                                 autotune_draft_lens="0,2,4,8", autotune_repeats=2)
        with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0) as server:
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(lambda item: request(server.grpc_url, item[1][0], item[1][1], **item[1][2]),
                                        load))
            groups = []
            for g, (prompt, length, options) in enumerate(seeded):
                answers = {tuple(r.token_ids) for (group, _), r in zip(load, results) if group == g}
                alone = tuple(request(server.grpc_url, prompt, length, mode="ar", **options).token_ids)
                groups.append({"prompt": prompt, "options": options, "distinct_answers": len(answers),
                               "equals_ar_alone": answers == {alone}})
    report = {"benchmark": "seeded_under_load", "date": datetime.date.today().isoformat(),
              "requests": len(load), "concurrency": 16, "seeded_groups": args.groups, "repeats": args.repeats,
              "groups_with_one_answer": sum(g["distinct_answers"] == 1 for g in groups),
              "groups_equal_to_ar_alone": sum(g["equals_ar_alone"] for g in groups), "groups": groups}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
