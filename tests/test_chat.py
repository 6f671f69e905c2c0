"""Chat rendering equals `transformers`' `apply_chat_template`; tokenization equals the reference tokenizer's; the
thinking split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from qwen_jax.chat import ChatTokenizer, split_thinking

TEMPLATE = (Path(__file__).parent / "data" / "qwen_style_chat_template.jinja").read_text()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
            "<tool_response>", "</tool_response>"]  # fmt: skip
WORDS = ["user", "assistant", "system", "hello", "world", "weather", "in", "Paris", "is", "sunny", "the", "what"]


def build_tokenizer(vocab_size: int = 300):
    """A word-level tokenizer of exactly `vocab_size` tokens with Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["[UNK]", *WORDS] + [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(WORDS) - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == vocab_size
    return tok


def write_chat_files(directory: Path, vocab_size: int = 300) -> None:
    build_tokenizer(vocab_size).save(str(directory / "tokenizer.json"))
    config = {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat")
    write_chat_files(directory)
    return ChatTokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city, in °C.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}}]  # fmt: skip
CONVERSATIONS = {
    "single": [{"role": "user", "content": "hello world"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is the weather"}],
    "multi_turn_thinking": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nhello world"},
        {"role": "user", "content": "weather in Paris"},
        {"role": "assistant", "content": "sunny", "reasoning_content": "look it up"},
    ],
    "tools": [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "weather in Paris"},
        {"role": "assistant", "content": "", "reasoning_content": "call the tool",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": json.dumps({"temp": 21, "sky": "sunny ☀"})},
        {"role": "tool", "content": "second result"},
        {"role": "assistant", "content": "Paris is sunny"},
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_apply_chat_template(tokenizers_pair, name, thinking, generation_prompt):
    ours, reference = tokenizers_pair
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    expected = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                             tokenize=False, **kwargs)  # fmt: skip
    got = ours.render(messages, tools=tools, add_generation_prompt=generation_prompt, enable_thinking=thinking)
    assert got == expected
    assert ours.encode(got) == reference.encode(expected, add_special_tokens=False)


def test_template_errors_are_input_errors(tokenizers_pair):
    from qwen_jax.errors import InputError

    with pytest.raises(InputError, match="system message must come first"):
        tokenizers_pair[0].render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        ("reasoning here\n</think>\n\nThe answer.", True, ("reasoning here", "The answer.")),
        ("still thinking", True, ("still thinking", "")),
        ("<think>\nplan\n</think>\nDone", False, ("plan", "Done")),
        ("Plain answer", False, ("", "Plain answer")),
    ],
)
def test_split_thinking(text, opened, expected):
    assert split_thinking(text, opened) == expected
