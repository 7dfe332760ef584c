"""Built-in verifiable tasks and the reward registry.

A reward function maps ``(prompt_text, completion_text) -> float``. Built-in ones are
registered by name in ``REWARDS``; a user's own is named ``path/to/file.py:function``.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Callable

RewardFn = Callable[[str, str], float]


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


TASKS = {"reverse": ReverseTask, "reverse_ragged": RaggedReverseTask, "mod_sum": ModSumTask}
REWARDS: dict[str, RewardFn] = {"reverse": ReverseTask.reward, "reverse_ragged": ReverseTask.reward,
                                "mod_sum": ModSumTask.reward}


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
