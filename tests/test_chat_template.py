"""The OpenAI front's chat templates (serving/openai_front.py `ChatTemplate`) against the oracle,
`transformers`' `PreTrainedTokenizerFast.apply_chat_template(..., tokenize=False)` on the same
checkpoint folder: the released-layout checkpoint (tests/released_checkpoint.py, Qwen's ChatML
template in tokenizer_config.json), the same checkpoint with a template in chat_template.jinja
that uses every feature transformers' Jinja environment adds, and the bundled model, which has
no template (both sides agree it has none)."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from tidar import BUNDLED_MODEL
from tidar.serving.openai_front import APIError, ChatTemplate, chat_messages, load_chat_template

from released_checkpoint import write_released_checkpoint

CONVERSATIONS = [
    [{"role": "user", "content": "Write a loop."}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Sort a list."}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2 — ünïcødé, \"quotes\" and <tags>"}],
]

RICH_TEMPLATE = """\
{#- every feature of transformers' environment: loopcontrols, tojson, raise_exception,
    strftime_now, namespace, dict, the generation tag, trim_blocks / lstrip_blocks #}
{%- set ns = namespace(turns=0, last_user='') %}
{%- set meta = dict(model='tiny', year=strftime_now('%Y')) %}
{{ bos_token or '' }}[meta {{ meta | tojson }}]
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['content'] == 'SKIP' %}{% continue %}{% endif %}
    {% if message['content'] == 'STOP' %}{% break %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if message['role'] == 'user' %}{% set ns.last_user = message['content'] %}{% endif %}
<|im_start|>{{ message['role'] }} {{ message | tojson(sort_keys=True) }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
[turns {{ ns.turns }}, last user {{ ns.last_user | tojson }}, eos {{ eos_token }}, pad {{ pad_token }}]
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("released") / "ckpt")


@pytest.fixture(scope="module")
def rich(released, tmp_path_factory):
    folder = shutil.copytree(released, tmp_path_factory.mktemp("rich") / "ckpt")
    (folder / "chat_template.jinja").write_text(RICH_TEMPLATE)  # takes priority over tokenizer_config.json's
    return folder


def oracle(folder, messages, add_generation_prompt=True):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_released_checkpoint_template_renders_as_transformers(released, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate.from_folder(released).render(chat_messages({"messages": messages}),
                                                      add_generation_prompt=generation_prompt)
    assert ours == oracle(released, messages, generation_prompt)
    assert ours.startswith("<|im_start|>") and ours.endswith("<|im_start|>assistant\n") == generation_prompt


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_every_environment_feature_renders_as_transformers(rich, conversation):
    messages = CONVERSATIONS[conversation] + [{"role": "user", "content": "SKIP"}, {"role": "user", "content": "last"},
                                              {"role": "user", "content": "STOP"}, {"role": "user", "content": "x"}]
    ours = ChatTemplate.from_folder(rich).render(chat_messages({"messages": messages}))
    expected = oracle(rich, messages)
    assert ours == expected
    assert "SKIP" not in ours and "STOP" not in ours and "last user \"last\", eos <|im_end|>" in ours
    assert "\\u00fc" not in ours  # tojson does not escape to ASCII


def test_a_template_exception_is_a_400_naming_messages_with_transformers_message(rich):
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.exceptions.TemplateError) as theirs:
        oracle(rich, messages)
    with pytest.raises(APIError) as ours:
        ChatTemplate.from_folder(rich).render(chat_messages({"messages": messages}))
    assert (ours.value.status, ours.value.param) == (400, "messages")
    assert str(theirs.value) == "unknown role tool" and str(theirs.value) in ours.value.message


def test_text_parts_and_null_assistant_content_as_transformers_sees_them(released):
    """A list of text parts is joined with newlines (vLLM's "string" content format) and a null
    assistant content is dropped, as transformers drops None-valued keys."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
             {"role": "assistant", "content": None}, {"role": "user", "content": "three"}]
    checked = chat_messages({"messages": parts})
    assert checked[0]["content"] == "one\ntwo"
    template = ChatTemplate.from_folder(released)
    with pytest.raises(APIError, match="chat template"):  # ChatML concatenates content: none is an error there
        template.render(checked)
    with pytest.raises(jinja2.exceptions.TemplateError):
        oracle(released, checked)  # content None: transformers drops the key too
    plain = [{"role": "user", "content": "one\ntwo"}, {"role": "user", "content": "three"}]
    assert template.render(chat_messages({"messages": plain})) == oracle(released, plain)


def test_the_bundled_model_has_no_template_on_either_side():
    assert load_chat_template(BUNDLED_MODEL)[0] is None and ChatTemplate.from_folder(BUNDLED_MODEL) is None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(BUNDLED_MODEL))
    with pytest.raises(ValueError, match="chat template"):
        tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    tokens = load_chat_template(BUNDLED_MODEL)[1]
    config = json.loads((BUNDLED_MODEL / "tokenizer_config.json").read_text())
    assert tokens == {name: config[name] for name in ("eos_token", "pad_token", "mask_token")}
    assert tokens == tokenizer.special_tokens_map
