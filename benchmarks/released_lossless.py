"""Greedy decoding of a released-layout checkpoint at real width: this runtime (AR, TiDAR b=16 with
k = 1 and 2 mask blocks) against transformers' Qwen3ForCausalLM, fp32, 12 new tokens, one prompt.

    python benchmarks/make_random_checkpoint.py --layout released --shape qwen3-1.7b CKPT
    python benchmarks/released_lossless.py CKPT          # prints one JSON object

The checkpoint loads with no flag (mask = <|fim_pad|>, block 16: the released layout)."""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer

path = sys.argv[1]
torch.set_num_threads(2)
tok = Tokenizer(path)
prompt = tok.encode("def fibonacci(n):\n    ")
t = time.time()
backend = TorchBackend.load(path, dtype="float32", attention="sdpa")
res = {"config": {"mask_token_id": backend.config.mask_token_id, "block_size": backend.config.block_size,
                  "trained_block_sizes": list(backend.config.trained_block_sizes)}}
for name, b, k in [("ar", 0, None), ("tidar_b16_k1", 16, 1), ("tidar_b16_k2", 16, 2)]:
    eng = DecodeEngine(backend, tok, draft_len=b, draft_blocks=k)
    out = eng.generate([Request(prompt, 12, eos_ids=())])[0]
    res[name] = list(out.token_ids)
del backend
hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
res["transformers"] = ids[0, len(prompt):].tolist()
res["architecture"] = type(hf).__name__
res["equal"] = all(res[n] == res["transformers"] for n in ("ar", "tidar_b16_k1", "tidar_b16_k2"))
res["seconds"] = round(time.time() - t, 1)
print(json.dumps(res))
