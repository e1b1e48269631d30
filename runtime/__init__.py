"""tidar.runtime: run TiDAR models.

config (typed config.json), layout (the hybrid mask and its lowerings), model (reference
transformer), cache (KV cache), checkpoint / tokenizer (loading), sampling (verification),
generate (the draft-verify loop), backend (the executor protocol and the PyTorch backend).
"""
