"""Prompts of a data set as the policy sees them: text (a chat template applied or not)
and token ids.

Keys (every RL pipeline and ``pipelines/sft.py``): ``data=PATH`` (``.jsonl`` or
``.parquet``), ``data.prompt_key`` (default ``prompt``), ``data.answer_key`` (default:
the first of ``reward_model.ground_truth``, ``answer``, ``ground_truth``, ``solution``
present), ``data.shuffle`` (per-epoch shuffling, default true), ``data.eval=PATH`` with
``eval_every=K`` (greedy evaluation), ``chat_template=true`` (render prompts with the
checkpoint's template).

A prompt that is chat messages is rendered with the template when ``chat_template=true``,
else its messages' contents are joined with newlines; a text prompt under
``chat_template=true`` becomes one user message.
"""
from __future__ import annotations

from pathlib import Path

from distflow.data.chat import ChatTemplate
from distflow.data.dataset import Dataset, is_messages

# the data keys every RL pipeline accepts (``Pipeline(params={**DATA_PARAMS, ...})``)
DATA_PARAMS = {"data": "", "data.prompt_key": "prompt", "data.answer_key": "",
               "data.shuffle": True, "data.eval": "", "eval_every": 0, "chat_template": False}


class PromptData:
    """A data set's prompts rendered and tokenized (each row once, cached)."""

    def __init__(self, params: dict, tokenizer, path: str | None = None):
        self.dataset = Dataset(path or params["data"], params.get("data.prompt_key", "prompt"),
                               params.get("data.answer_key", ""))
        self.tok = tokenizer
        self.chat = None
        if params.get("chat_template"):
            if not Path(params["model"]).is_dir():
                raise ValueError("chat_template=true needs model= to be a checkpoint directory "
                                 "with a chat template")
            self.chat = ChatTemplate(params["model"])
        self._tokens: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def text(self, i: int) -> str:
        prompt = self.dataset.prompt(i)
        if self.chat is not None:
            messages = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
            return self.chat.render(messages, add_generation_prompt=True)
        if is_messages(prompt):
            return "\n".join(str(m["content"]) for m in prompt)
        return prompt

    def tokens(self, i: int) -> list[int]:
        if i not in self._tokens:
            try:
                ids = self.tok.encode(self.text(i))
            except ValueError as e:
                raise ValueError(f"{self.dataset.path}: prompt of row {i}: {e}") from None
            if not ids:
                raise ValueError(f"{self.dataset.path}: prompt of row {i} is empty")
            self._tokens[i] = ids
        return self._tokens[i]

    def check_lengths(self, max_prompt_len: int) -> None:
        """Every prompt fits ``max_prompt_len`` tokens, else an error naming the row."""
        longest, row = 0, 0
        for i in range(len(self)):
            n = len(self.tokens(i))
            if n > longest:
                longest, row = n, i
        if longest > max_prompt_len:
            raise ValueError(f"{self.dataset.path}: the prompt of row {row} has {longest} tokens, "
                             f"over max_prompt_len={max_prompt_len}")
