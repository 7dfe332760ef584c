"""Chat templates: a checkpoint's own Jinja template rendered the way ``transformers`` does.

The template comes from ``chat_template.jinja`` or the ``chat_template`` field of
``tokenizer_config.json`` (a string, or a list of named templates: ``default``). It is
rendered in jinja2's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that keeps non-ASCII text, the globals
``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables; the text is then tokenized without
adding special tokens. That is what ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`` does, so the token ids are the same (a test checks it).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                  "mask_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_chat_template(directory: str | Path) -> str | None:
    """The checkpoint's chat template text, or None when it has none."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = _read_json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def special_tokens(directory: str | Path) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... as strings, from ``tokenizer_config.json``."""
    config = _read_json(Path(directory) / "tokenizer_config.json")
    out = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


@lru_cache(maxsize=4)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): the body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                **variables) -> str:
    """The text of ``messages`` under ``template`` (``variables``: special tokens, ...)."""
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **variables)


class ChatTemplate:
    """A checkpoint's template with its special tokens: ``render(messages) -> str``."""

    def __init__(self, directory: str | Path):
        template = load_chat_template(directory)
        if template is None:
            raise ValueError(f"chat_template=true but {directory} has no chat template "
                             "(chat_template.jinja or chat_template in tokenizer_config.json)")
        self.template, self.tokens = template, special_tokens(directory)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.template, messages, add_generation_prompt, **self.tokens)
