"""Tokenizers: a character-level one for built-in tasks, and HF ``tokenizer.json`` files.

Both follow ``Tokenizer``: ``encode`` never adds special tokens (callers add BOS/EOS where
they want them) and ``decode`` drops them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as _HFTok

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


def _as_int_list(ids) -> list[int]:
    """A list of ints from a list / tuple / 1-D tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        raise ValueError(f"decode takes one sequence of ids, got a nested list of {len(ids)} sequences")
    return [int(i) for i in ids]


class CharTokenizer:
    """One id per character of ``alphabet``, after ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2."""

    SPECIALS = ("<pad>", "<eos>", "<bos>")

    def __init__(self, alphabet: str):
        if not alphabet:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        seen = set()
        for ch in alphabet:
            if ch in seen:
                raise ValueError(f"character {ch!r} appears twice in the alphabet")
            seen.add(ch)
        self.alphabet = alphabet
        self.pad_id, self.eos_id, self.bos_id = 0, 1, 2
        offset = len(self.SPECIALS)
        self._to_id = {ch: i + offset for i, ch in enumerate(alphabet)}
        self.vocab_size = offset + len(alphabet)

    def encode(self, text: str) -> list[int]:
        """``text`` -> one id per character (no BOS/EOS added)."""
        try:
            return [self._to_id[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the alphabet {self.alphabet!r}") from None

    def decode(self, ids) -> str:
        """Ids -> text; special tokens are dropped."""
        out = []
        offset = len(self.SPECIALS)
        for i in _as_int_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
            if i >= offset:
                out.append(self.alphabet[i - offset])
        return "".join(out)

    def save(self, directory: str | Path) -> Path:
        """Write ``char_tokenizer.json`` into ``directory`` (``load_tokenizer`` reads it back)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHAR_TOKENIZER_FILE
        path.write_text(json.dumps({"type": "char", "alphabet": self.alphabet}) + "\n")
        return path

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r})"


# ---------------------------------------------------------------------------- HF tokenizer.json
_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _token_content(value) -> str | None:
    """``tokenizer_config.json`` writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """``tokenizers.Tokenizer`` from ``directory/tokenizer.json``.

    Special ids, first found wins: the token strings in ``tokenizer_config.json``; the ids in
    ``config.json`` / ``generation_config.json`` (a list of EOS ids gives its first); common
    token names (``<|endoftext|>``, ``</s>``, ...). ``pad_id`` falls back to ``eos_id``.
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        self.directory = directory
        self._tok = _HFTok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tok_config = _read_json(directory / "tokenizer_config.json")
        model_configs = [_read_json(directory / name) for name in ("config.json", "generation_config.json")]

        def resolve(name: str, guesses: tuple[str, ...]) -> int | None:
            token = _token_content(tok_config.get(f"{name}_token"))
            if token is not None:
                token_id = self._tok.token_to_id(token)
                if token_id is None:
                    raise ValueError(f"{directory}/tokenizer_config.json names {name}_token {token!r}, "
                                     f"which is not in tokenizer.json")
                return token_id
            for cfg in model_configs:
                value = cfg.get(f"{name}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
            for token in guesses:
                token_id = self._tok.token_to_id(token)
                if token_id is not None:
                    return token_id
            return None

        eos = resolve("eos", _EOS_GUESSES)
        if eos is None:
            raise ValueError(f"cannot determine the EOS token of the tokenizer in {directory}: set eos_token "
                             f"in tokenizer_config.json or eos_token_id in config.json")
        self.eos_id: int = eos
        self.bos_id: int | None = resolve("bos", _BOS_GUESSES)
        pad = resolve("pad", _PAD_GUESSES)
        self.pad_id: int = eos if pad is None else pad

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids, without the special tokens a post-processor would add."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Ids -> text, special tokens skipped."""
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.directory)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | Path) -> CharTokenizer | HFTokenizer:
    """The tokenizer saved in ``directory``: ``tokenizer.json`` (HF) or ``char_tokenizer.json``."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory)
    char_file = directory / CHAR_TOKENIZER_FILE
    if char_file.is_file():
        spec = _read_json(char_file)
        return CharTokenizer(spec["alphabet"])
    raise FileNotFoundError(f"no tokenizer.json or {CHAR_TOKENIZER_FILE} in {directory}")
