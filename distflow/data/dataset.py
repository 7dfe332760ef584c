"""Users' data sets: rows of a JSONL or Parquet file, read the same way by every worker.

A row is a dict (any columns, nested ones too). ``Dataset`` knows which column is the
prompt and which is the answer (ground truth), and recognises verl's layout as is
(``prompt`` = chat messages, ``reward_model.ground_truth``, ``data_source``,
``extra_info``). A dotted key such as ``reward_model.ground_truth`` reads a nested field.

Order: epoch ``e`` visits every row once, in ``torch.randperm(n)`` order seeded with
``(seed, e)``. A run's position in that endless stream is one integer, the number of rows
consumed (``Cursor.position``): the row at position ``p`` is ``perm(p // n)[p % n]``, so
the cursor is all a checkpoint needs to continue mid-epoch or across epochs with no row
skipped or repeated. The position is also the sample's prompt id, unique over the run.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

# where verl and common data sets keep the reference answer, tried in order
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "ground_truth", "solution")


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl`` (one JSON object per line) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"data file {str(path)!r}: expected .jsonl or .parquet")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON object: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def get_field(row: dict, key: str) -> Any:
    """``row[key]``, where a dotted key reads nested dicts; KeyError if absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def has_field(row: dict, key: str) -> bool:
    try:
        get_field(row, key)
        return True
    except KeyError:
        return False


def is_messages(value: Any) -> bool:
    """Chat messages: a list of ``{"role": ..., "content": ...}``."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                           for m in value) and bool(value)


class Dataset:
    """Rows of ``path`` with their prompt (``prompt_key``) and answer (``answer_key``, or
    the first of ``ANSWER_KEYS`` present when empty) columns. Checked on load: every row
    has a prompt that is a string or chat messages."""

    def __init__(self, path: str | Path, prompt_key: str = "prompt", answer_key: str = ""):
        self.path = Path(path)
        self.rows = _cached_rows(str(self.path.resolve()), self.path.stat().st_mtime_ns)
        if not self.rows:
            raise ValueError(f"data file {str(path)!r} has no rows")
        self.prompt_key = prompt_key
        first = self.rows[0]
        if answer_key:
            self.answer_key = answer_key
        else:
            self.answer_key = next((k for k in ANSWER_KEYS if has_field(first, k)), "")
        for i, row in enumerate(self.rows):
            if not has_field(row, prompt_key):
                raise ValueError(f"{path}: row {i} has no prompt column {prompt_key!r} "
                                 f"(its columns: {sorted(row)}); set data.prompt_key")
            p = get_field(row, prompt_key)
            if not (isinstance(p, str) or is_messages(p)):
                raise ValueError(f"{path}: row {i} column {prompt_key!r} is neither text nor chat "
                                 f"messages ({type(p).__name__})")
            if self.answer_key and not has_field(row, self.answer_key):
                raise ValueError(f"{path}: row {i} has no answer column {self.answer_key!r} "
                                 f"(its columns: {sorted(row)}); set data.answer_key")

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, i: int) -> str | list[dict]:
        return get_field(self.rows[i], self.prompt_key)

    def answer(self, i: int) -> Any:
        """The row's ground truth (None when the data set has no answer column)."""
        return get_field(self.rows[i], self.answer_key) if self.answer_key else None

    def fingerprint(self) -> str:
        """Identifies the rows (a checkpoint refuses to continue on different data)."""
        return _fingerprint(str(self.path.resolve()), self.path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _cached_rows(path: str, mtime_ns: int) -> list[dict]:
    return load_rows(path)


@lru_cache(maxsize=8)
def _fingerprint(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Cursor:
    """The position in the endless, per-epoch shuffled stream of ``n`` rows."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, position: int = 0):
        if n < 1:
            raise ValueError("a data set needs at least one row")
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position
        self._epoch, self._perm = -1, torch.arange(n)

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def rows_at(self, start: int, count: int) -> list[int]:
        """Row indices at stream positions ``[start, start + count)``."""
        out = []
        for p in range(start, start + count):
            out.append(int(self.permutation(p // self.n)[p % self.n]))
        return out

    def take(self, count: int) -> tuple[int, list[int]]:
        """``(first position, row indices)`` of the next ``count`` rows; advances."""
        start = self.position
        self.position += count
        return start, self.rows_at(start, count)

    def state(self) -> dict:
        return {"position": self.position, "epoch": self.position // self.n, "rows": self.n,
                "seed": self.seed, "shuffle": self.shuffle}

    def save(self, path: Path, fingerprint: str = "") -> None:
        from distflow.checkpoint import write_json
        write_json(path, {**self.state(), "fingerprint": fingerprint})

    def load(self, path: Path, fingerprint: str = "") -> None:
        state = json.loads(Path(path).read_text())
        if state["rows"] != self.n or (fingerprint and state.get("fingerprint")
                                        and state["fingerprint"] != fingerprint):
            raise ValueError(f"checkpoint {path} was taken on a different data set "
                             f"({state['rows']} rows, fingerprint {state.get('fingerprint')}); "
                             f"this one has {self.n} rows, fingerprint {fingerprint}")
        self.position = int(state["position"])
