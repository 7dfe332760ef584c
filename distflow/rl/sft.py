"""Supervised fine-tuning stages (``pipelines/sft.py``): packed sequences, loss on the
response tokens only.

A row of the data set is a prompt and a response (``data.prompt_key``,
``data.response_key``), or chat messages whose last message is the assistant's answer.
Each example is ``prompt tokens + response tokens + EOS``; the loss is the next-token
cross-entropy of the response tokens and the EOS, summed over the step and divided by
their count over every rank. Examples are packed into rows of ``seq_len`` tokens: each
example attends only to itself (a block-diagonal causal mask) and its positions restart
at 0, so packing gives the same loss as one example per row, without the padding.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from distflow import Batch
from distflow.data.dataset import Cursor, Dataset, get_field, is_messages
from distflow.rl import actors


class SFTExamples:
    """Token ids of each row: ``(prompt ids, response ids + [EOS])``."""

    def __init__(self, params: dict, tok):
        self.dataset = Dataset(params["data"], params["data.prompt_key"], "")
        self.tok, self.response_key = tok, params["data.response_key"]
        self.chat = None
        if params.get("chat_template"):
            from distflow.data.chat import ChatTemplate
            self.chat = ChatTemplate(params["model"])
        self._cache: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def texts(self, i: int) -> tuple[str, str]:
        prompt = self.dataset.prompt(i)
        if is_messages(prompt) and prompt[-1]["role"] == "assistant":
            prompt, response = prompt[:-1], str(prompt[-1]["content"])
        else:
            try:
                response = str(get_field(self.dataset.rows[i], self.response_key))
            except KeyError:
                raise ValueError(f"{self.dataset.path}: row {i} has no response column "
                                 f"{self.response_key!r} and its prompt does not end with an "
                                 "assistant message; set data.response_key") from None
        if self.chat is not None:
            messages = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
            return self.chat.render(messages, add_generation_prompt=True), response
        if is_messages(prompt):
            prompt = "\n".join(str(m["content"]) for m in prompt)
        return prompt, response

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self._cache:
            prompt, response = self.texts(i)
            try:
                self._cache[i] = (self.tok.encode(prompt), self.tok.encode(response) + [self.tok.eos_id])
            except ValueError as e:
                raise ValueError(f"{self.dataset.path}: row {i}: {e}") from None
        return self._cache[i]

    def check(self, seq_len: int) -> None:
        for i in range(len(self)):
            p, r = self.tokens(i)
            if len(p) + len(r) > seq_len:
                raise ValueError(f"{self.dataset.path}: row {i} has {len(p)} prompt + {len(r)} "
                                 f"response tokens, over seq_len={seq_len}")


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Greedy in-order packing into rows of ``seq_len``: ``tokens``, ``positions``,
    ``segments`` (1, 2, ... per example in its row; 0 = padding) and ``targets`` (the next
    token where it is a response token to learn, else -100) [rows, seq_len]."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ex in examples:
        n = len(ex[0]) + len(ex[1])
        if used + n > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    out = {k: torch.full((len(rows), seq_len), v, dtype=torch.int64)
           for k, v in (("tokens", pad_id), ("positions", 0), ("segments", 0), ("targets", -100))}
    for r, row in enumerate(rows):
        at = 0
        for s, (prompt, response) in enumerate(row, 1):
            ids = prompt + response
            n = len(ids)
            out["tokens"][r, at:at + n] = torch.tensor(ids)
            out["positions"][r, at:at + n] = torch.arange(n)
            out["segments"][r, at:at + n] = s
            # position t predicts token t+1: targets for the response tokens only
            out["targets"][r, at + len(prompt) - 1:at + n - 1] = torch.tensor(response)
            at += n
    return out


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: query i may attend key j <= i of its own example; padding sees itself."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    real = (segments > 0)[:, :, None]
    return (same & causal & real) | torch.eye(t, dtype=torch.bool)


class SFTData:
    """Source: the step's ``batch_size`` examples from the shuffled stream (this rank's
    shard), packed. The stream position is saved in checkpoints."""

    def __init__(self, ctx):
        self.tok = actors.tokenizer(ctx)
        self.examples = SFTExamples(ctx.params, self.tok)
        self.cursor = Cursor(len(self.examples), ctx.seed, ctx.params["data.shuffle"])

    def __call__(self, ctx):
        n, seq_len = ctx.params["batch_size"], ctx.params["seq_len"]
        first, rows = self.cursor.take(n)
        mine = list(ctx.shard(n))
        packed = pack([self.examples.tokens(rows[i]) for i in mine], seq_len, self.tok.pad_id)
        count = len(packed["tokens"])
        ids = torch.arange(count, dtype=torch.int64) + (first + ctx.dp_rank * n) * 1024
        ctx.log(**{"data/epoch": first // len(self.examples)})
        return {"packed": Batch(packed, ids, (packed["segments"] > 0).sum(1))}

    def save_checkpoint(self, ctx, directory: Path) -> None:
        if ctx.dp_rank == 0:
            self.cursor.save(directory / "data_state.json", self.examples.dataset.fingerprint())

    def load_checkpoint(self, ctx, directory: Path) -> None:
        self.cursor.load(directory / "data_state.json", self.examples.dataset.fingerprint())


class SFTUpdate:
    """One optimizer step of response-only cross-entropy; after the last step the model is
    written to ``OUT/model`` (HF format + tokenizer), a ``model=`` for the RL pipelines."""

    holds = {"policy": "train"}

    def __init__(self, ctx):
        self.actor = actors.actor(ctx)

    def _loss(self, batch: Batch):
        model = self.actor.model
        dev = next(model.parameters()).device
        logits = model(batch["tokens"].to(dev), batch["positions"].to(dev),
                       block_mask(batch["segments"]).to(dev))
        targets = batch["targets"].to(dev)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction="sum")
        n = float((targets != -100).sum())
        with torch.no_grad():
            hit = (logits.argmax(-1) == targets) & (targets != -100)
        return loss, {"loss": float(loss.detach()), "tokens": n, "correct": float(hit.sum())}

    def __call__(self, ctx, packed: Batch):
        stats = self.actor.train.step(len(packed), packed.lengths, lambda i: self._loss(packed.select(i)),
                                      normalizer="tokens", sums=("loss", "correct"))
        t = max(stats.get("tokens", 0.0), 1.0)
        ctx.log(**{"sft/loss": stats.get("loss", 0.0) / t, "sft/token_accuracy": stats.get("correct", 0.0) / t,
                   "sft/grad_norm": stats["grad_norm"], "count/response_tokens": stats.get("tokens", 0.0)
                   / max(len(ctx.ranks), 1)})
        if ctx.step == ctx.steps - 1 and ctx.dp_rank == 0:
            export_model(ctx, self.actor.model, ctx.out_dir / "model")

    def save_checkpoint(self, ctx, directory: Path) -> None:
        self.actor.train.save(directory, ctx.island)
        actors.save_model_files(ctx, self.actor.train, directory)  # what `distflow export` reads

    def load_checkpoint(self, ctx, directory: Path) -> None:
        self.actor.train.load(directory, ctx.island)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "char_tokenizer.json")


def export_model(ctx, model, directory: Path) -> Path:
    """``model`` in HF format plus the tokenizer it was trained with."""
    import shutil

    from distflow.models import save_pretrained
    from distflow.models.tokenizer import CharTokenizer

    save_pretrained(model, directory)
    source = Path(ctx.params["model"])
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
    tok = actors.tokenizer(ctx)
    if isinstance(tok, CharTokenizer):
        tok.save(directory)
    return directory


def check_sft_params(params: dict) -> None:
    """Before launch: a data file, every example fits ``seq_len`` and the model context."""
    from distflow.models import ModelConfig
    from distflow.rl.actors import preset_config, tokenizer_for

    if not params.get("data"):
        raise ValueError("sft needs data=PATH (a .jsonl or .parquet of prompt/response rows)")
    for key in ("batch_size", "seq_len"):
        if params[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {params[key]}")
    tok = tokenizer_for(params)
    model = params["model"]
    cfg = ModelConfig.from_pretrained(model) if Path(model).is_dir() else preset_config(model, tok)
    if params["seq_len"] > cfg.max_position_embeddings:
        raise ValueError(f"seq_len={params['seq_len']} exceeds the model context of "
                         f"{cfg.max_position_embeddings}")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but model {model!r} has "
                         f"{cfg.vocab_size} embeddings")
    SFTExamples(params, tok).check(params["seq_len"])
