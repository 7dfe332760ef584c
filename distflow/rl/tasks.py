"""Built-in verifiable tasks and the reward registry.

A reward is one of three kinds, told apart by its signature (``reward_kind``):

- ``f(prompt, completion) -> float``: the built-in tasks' form, per sample;
- verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None)`` ->
  float (or a dict with a ``score``), per sample: detected by a ``solution_str`` parameter;
- TRL's ``f(prompts, completions, **columns) -> list[float]``, per batch: detected by a
  ``completions`` parameter; it gets every column of the data rows as lists.

Built-in ones are registered by name in ``REWARDS``; a user's own is named
``path/to/file.py:function``. ``Scorer`` calls any of them on a batch of texts and rows.
"""
from __future__ import annotations

import importlib.util
import inspect
import math as _math
import random
import re
import string
from pathlib import Path
from typing import Any, Callable

RewardFn = Callable[..., Any]


class ModSumTask:
    """``"a+b="`` -> the last digit of a + b, e.g. ``"7+8="`` -> ``"5"``.

    Reward (in [0, 1]): 1 for exactly the right digit then EOS, 0.5 for the right digit
    followed by more text, 0 otherwise; a random policy scores about 0.05.
    """

    alphabet = "0123456789+="
    max_prompt_len = 4

    def prompts(self, n: int, seed: int, step: int) -> list[str]:
        rng = random.Random(seed * 1_000_003 + step)
        return [f"{rng.randrange(10)}+{rng.randrange(10)}=" for _ in range(n)]

    @staticmethod
    def reward(prompt: str, completion: str) -> float:
        a, b = int(prompt[0]), int(prompt[2])
        answer = str((a + b) % 10)
        if completion == answer:
            return 1.0
        return 0.5 if completion.startswith(answer) else 0.0


class ReverseTask:
    """``"37="`` -> ``"73"``: write the digits backwards.

    Reward (in [0, 1]): the fraction of positions that match, over the longer of answer
    and completion, so extra or missing digits cost; a random policy scores about 0.05.
    """

    alphabet = "0123456789="
    digits = 2
    max_prompt_len = digits + 1

    def prompts(self, n: int, seed: int, step: int) -> list[str]:
        rng = random.Random(seed * 1_000_003 + step)
        return ["".join(str(rng.randrange(10)) for _ in range(self.digits)) + "=" for _ in range(n)]

    @staticmethod
    def reward(prompt: str, completion: str) -> float:
        answer = prompt.rstrip("=")[::-1]
        hits = sum(a == c for a, c in zip(answer, completion))
        return hits / max(len(answer), len(completion), 1)


class RaggedReverseTask(ReverseTask):
    """``reverse`` with 1 to 64 digits per prompt (uniform): answers of very uneven length,
    as in real RL runs where most of the time goes to long, ragged generations."""

    min_digits, max_digits = 1, 64
    max_prompt_len = max_digits + 1

    def prompts(self, n: int, seed: int, step: int) -> list[str]:
        rng = random.Random(seed * 1_000_003 + step)
        return ["".join(str(rng.randrange(10)) for _ in range(rng.randint(self.min_digits, self.max_digits))) + "="
                for _ in range(n)]


# -- math answers -----------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: after the last ``####``, else the last
    ``\\boxed{...}``, else the last number in the text; None when there is none."""
    text = str(text)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip() or None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(text: str | None) -> float | None:
    """``"1,234"`` -> 1234.0, ``"$3.50"`` -> 3.5, ``"3/4"`` -> 0.75; None if not a number."""
    if text is None:
        return None
    found = _NUMBER.findall(str(text).replace("\\frac{", "").replace("}{", "/"))
    if len(found) != 1:
        return None
    raw = found[0].replace(",", "")
    try:
        if "/" in raw:
            num, den = raw.split("/")
            return float(num) / float(den) if float(den) else None
        return float(raw)
    except ValueError:
        return None


def math_reward(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None) -> float:
    """``reward=math`` (verl's signature): 1.0 when the completion's final answer equals the
    ground truth's numerically (to 1e-6 relative), else 0.0. The final answer of each is
    taken by ``extract_answer`` (``#### N``, ``\\boxed{N}``, the last number)."""
    got = to_number(extract_answer(solution_str))
    want = to_number(extract_answer(ground_truth)) if isinstance(ground_truth, str) else (
        float(ground_truth) if isinstance(ground_truth, (int, float)) else None)
    if got is None or want is None:
        return 0.0
    return 1.0 if _math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9) else 0.0


# characters of a character-level tokenizer for text data sets (preset models trained from
# scratch): newline and printable ASCII
TEXT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(string.printable) - set(TEXT_ALPHABET) <= set("\t\r\x0b\x0c")

TASKS = {"reverse": ReverseTask, "reverse_ragged": RaggedReverseTask, "mod_sum": ModSumTask}
REWARDS: dict[str, RewardFn] = {"reverse": ReverseTask.reward, "reverse_ragged": ReverseTask.reward,
                                "mod_sum": ModSumTask.reward, "math": math_reward}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()


def get_reward(name: str) -> RewardFn:
    """A registered reward, or ``path/to/file.py:function`` for a user's own."""
    if name in REWARDS:
        return REWARDS[name]
    path, sep, fn = name.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)} "
                         "or path/to/file.py:function")
    if not Path(path).is_file():
        raise ValueError(f"reward file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"distflow_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, fn, None)):
        raise ValueError(f"{path} has no function {fn!r}")
    return getattr(module, fn)


def reward_kind(fn: RewardFn) -> str:
    """``"verl"``, ``"trl"`` or ``"text"`` (``f(prompt, completion)``), from the signature."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "text"
    if "solution_str" in params:
        return "verl"
    if "completions" in params:
        return "trl"
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(positional) > 2:
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} takes {len(positional)} "
                         "required arguments; expected f(prompt, completion), verl's "
                         "compute_score(data_source, solution_str, ground_truth, extra_info) or "
                         "TRL's f(prompts, completions, **columns)")
    return "text"


class Scorer:
    """Calls a reward of any kind on a batch: ``score(prompts, completions, rows, ids)``.

    ``rows`` are the data rows of the samples (every column; None without a data set),
    ``answers`` their ground truths. A failing reward names the sample and its texts."""

    def __init__(self, name: str):
        self.name, self.fn = name, get_reward(name)
        self.kind = reward_kind(self.fn)

    def score(self, prompts: list[str], completions: list[str], rows: list[dict | None],
              answers: list[Any], sample_ids: list[int]) -> list[float]:
        if self.kind == "trl":
            columns = sorted({k for r in rows if r for k in r})
            kwargs = {k: [(r or {}).get(k) for r in rows] for k in columns if k not in ("prompt", "completion")}
            kwargs.setdefault("ground_truth", list(answers))
            try:
                out = list(self.fn(prompts=prompts, completions=completions, **kwargs))
            except Exception as e:
                raise ValueError(f"reward function {self.name!r} raised on samples {sample_ids[:4]}...: "
                                 f"{type(e).__name__}: {e}") from e
            if len(out) != len(prompts):
                raise ValueError(f"reward function {self.name!r} returned {len(out)} rewards for "
                                 f"{len(prompts)} completions")
            return [self._float(v, i, prompts, completions, sample_ids) for i, v in enumerate(out)]
        rewards = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                if self.kind == "verl":
                    row = rows[i] or {}
                    value = self.fn(data_source=row.get("data_source", ""), solution_str=completion,
                                    ground_truth=answers[i], extra_info=row.get("extra_info"))
                    if isinstance(value, dict):
                        value = value["score"]
                else:
                    value = self.fn(prompt, completion)
            except Exception as e:
                raise ValueError(f"reward function {self.name!r} raised on sample {sample_ids[i]} "
                                 f"(prompt {prompt!r}, completion {completion!r}): "
                                 f"{type(e).__name__}: {e}") from e
            rewards.append(self._float(value, i, prompts, completions, sample_ids))
        return rewards

    def _float(self, value, i, prompts, completions, sample_ids) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            out = _math.nan
        if not _math.isfinite(out):
            raise ValueError(f"reward function {self.name!r} returned {value!r} for sample "
                             f"{sample_ids[i]} (prompt {prompts[i]!r}, completion {completions[i]!r}); "
                             "expected a finite number")
        return out
