"""Text in and out: the checkpoint's tokenizer (`tokenizer.json`, via `tokenizers`), its chat template rendered
exactly as `transformers`' `apply_chat_template` renders it, and the thinking part of a reply split from the answer.

Nothing here imports jax, so command lines can validate prompts before paying for it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

from qwen_jax.errors import InputError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that, like the reference's, refuses underscore attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` blocks (assistant-mask markers) and render their body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    """A chat template in the environment the reference uses: sandboxed, trim/lstrip blocks, loop controls,
    `tojson` without HTML escaping, `raise_exception`, `strftime_now`, `dict`, `namespace`."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=lambda *a, **k: dict(*a, **k),
        namespace=_Namespace,
    )
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """JSON-typed copy of template inputs (what the reference lets a template see)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatTokenizer:
    """The tokenizer and chat template of a checkpoint directory."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.exists():
            raise InputError(f"{directory}: no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own exception type
            raise InputError(f"{file}: cannot be read ({e})") from None
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.special_tokens = {
            name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES if _token_text(config.get(name))
        }
        template_file = directory / "chat_template.jinja"
        source = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self.template = compile_template(source) if source else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """The chat as the model sees it, as `apply_chat_template(messages, tools=..., add_generation_prompt=...,
        enable_thinking=..., tokenize=False)` renders it."""
        if self.template is None:
            raise InputError("this checkpoint has no chat template; use plain prompts (--no-chat)")
        if not messages:
            raise InputError("empty conversation")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        try:
            return self.template.render(
                messages=_plain(messages),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.exceptions.TemplateError as e:
            raise InputError(f"chat template: {e}") from None


def split_thinking(text: str, opened: bool) -> tuple[str, str]:
    """(thinking, answer) of a generated reply. `opened`: the prompt already opened a `<think>` block (Qwen3.5's
    generation prompt does when thinking is on). Without a closing `</think>`, an opened reply is all thinking."""
    if text.lstrip().startswith(THINK_OPEN):
        text, opened = text.lstrip()[len(THINK_OPEN) :], True
    if not opened:
        return "", text.strip()
    thinking, closed, answer = text.partition(THINK_CLOSE)
    return thinking.strip(), answer.strip() if closed else ""
