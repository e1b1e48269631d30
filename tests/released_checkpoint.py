"""A tiny random-weight checkpoint in exactly the layout of the released TiDAR-LM models.

    folder = write_released_checkpoint(tmp_path / "released", generation_eos=[...])

What a downloaded TiDAR-LM checkpoint holds, at toy size (docs/design.md §1.1):

- config.json: a Qwen3 config (transformers 4.x spelling, the fields Qwen3's own config.json
  has) whose `architectures` is `["TiDARForCausalLM"]`, and no `tidar` block;
- a Qwen-like byte-level BPE tokenizer.json whose added tokens follow the BPE vocabulary in
  Qwen's order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (special), then `<|fim_prefix|>`,
  `<|fim_middle|>`, `<|fim_suffix|>`, `<|fim_pad|>` (not special: Qwen's tokenizer_config marks
  them so); `<|fim_pad|>` is [MASK];
- tokenizer_config.json as Qwen ships it: class Qwen2Tokenizer, eos `<|im_end|>`, pad
  `<|endoftext|>`, no BOS, `added_tokens_decoder`, and a ChatML chat template;
- generation_config.json as Qwen3's: bos, `eos_token_id` a list, pad, do_sample and the
  sampling defaults temperature 0.6, top_k 20, top_p 0.95;
- bf16 safetensors, untied LM head, a config vocabulary padded past the tokenizer's (Qwen's
  151936 rows for 151669 tokens).

Shared by the tests of the released layout (tests/test_released_checkpoint.py) and of the chat
template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tidar.runtime.config import TiDARConfig
from tidar.runtime.model import TiDARModel
from tidar.train.checkpoint import init_random_weights, save_checkpoint, stdlib_files

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen's special added tokens, in its order (ids follow the BPE vocabulary)."""
FIM = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
"""Qwen's FIM tokens, added after the special ones and not special themselves."""
MASK_TOKEN = "<|fim_pad|>"
BLOCK_SIZE = 16
"""The block size of the released models (a setting of the authors' server)."""

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML, as Qwen's templates render plain messages."""


def qwen_like_bpe(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on stdlib source, with no token of its own
    beyond them (Qwen's added tokens follow its BPE vocabulary)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in stdlib_files(30)], trainer)
    return tokenizer


def token_ids(folder: str | Path) -> dict[str, int]:
    """{added token: id} of the checkpoint's tokenizer.json."""
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return {token: tokenizer.token_to_id(token) for token in SPECIAL + FIM}


def write_released_checkpoint(folder: str | Path, seed: int = 0, bpe_vocab: int = 400,
                              generation_eos: list[int] | None = None, with_fim_pad: bool = True,
                              architecture: str = "TiDARForCausalLM") -> Path:
    """Write the checkpoint into `folder` and return it. `generation_eos`: generation_config.json's
    eos list (default Qwen3's [<|im_end|>, <|endoftext|>]); `with_fim_pad` False leaves
    `<|fim_pad|>` out of the tokenizer (a checkpoint the released-layout rule must refuse);
    `architecture` is config.json's `architectures` entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_like_bpe(bpe_vocab)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    fim = FIM if with_fim_pad else FIM[:-1]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in fim])
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL + fim}
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = (tokenizer_size + 63) // 64 * 64  # padded past the tokenizer, as Qwen's 151936 rows

    config = dict(
        architectures=[architecture], attention_bias=False, attention_dropout=0.0,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], head_dim=32, hidden_act="silu",
        hidden_size=64, initializer_range=0.02, intermediate_size=128, max_position_embeddings=2048,
        max_window_layers=2, model_type="qwen3", num_attention_heads=4, num_hidden_layers=2,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.51.0", use_cache=True,
        use_sliding_window=False, vocab_size=vocab_size)
    # The weights: the runtime's model of this config (the mask id only matters for the runtime).
    model_config = TiDARConfig.from_dict({**config, "tidar": {"mask_token_id": ids.get(MASK_TOKEN, 0),
                                                              "block_size": BLOCK_SIZE}})
    model = TiDARModel(model_config)
    init_random_weights(model, seed)
    save_checkpoint(model.to(torch.bfloat16), folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # the released layout's own

    decoder = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": t in SPECIAL} for t in SPECIAL + fim}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL[1:]), "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 2048, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2) + "\n")
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]] if generation_eos is None else list(generation_eos)
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True, "eos_token_id": eos,
        "pad_token_id": ids["<|endoftext|>"], "temperature": 0.6, "top_k": 20, "top_p": 0.95,
        "transformers_version": "4.51.0"}, indent=2) + "\n")
    return folder
