"""CPU time of one attention call with grouped-query heads: K/V expanded to every query head
first (the SDPA path before `enable_gqa`) against K/V handed to the kernel as they are, at decode
shapes of the bundled model (8 query heads, 2 KV heads, head dim 32), one thread.

    python benchmarks/sdpa_gqa.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = ((1, 1, 200), (16, 1, 200), (16, 8, 210), (16, 24, 230), (1, 272, 400), (8, 272, 400))
"""(batch, query tokens, attended slots)."""


def expanded(q, k, v, mask, scale):
    repeat = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                          attn_mask=mask, scale=scale)


def grouped(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def cpu_ms(function, *args, calls: int = 200) -> float:
    for _ in range(5):
        function(*args)
    start = time.process_time()
    for _ in range(calls):
        function(*args)
    return (time.process_time() - start) / calls * 1e3


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("batch  query  slots  expanded ms  grouped ms  equal")
    for batch, new, slots in SHAPES:
        q = torch.randn(batch, 8, new, 32, generator=generator)
        k, v = (torch.randn(batch, 2, slots, 32, generator=generator) for _ in range(2))
        mask = torch.rand(batch, 1, new, slots, generator=generator) > 0.3
        mask[..., 0] = True
        args = (q, k, v, mask, 32 ** -0.5)
        same = torch.equal(expanded(*args), grouped(*args))
        print(f"{batch:5d}  {new:5d}  {slots:5d}  {cpu_ms(expanded, *args):11.3f}  {cpu_ms(grouped, *args):10.3f}  {same}")


if __name__ == "__main__":
    main()
