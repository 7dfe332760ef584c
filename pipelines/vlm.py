"""Vision-language training, DistTrain-style: preprocessing, the image encoder and the LLM
on worker groups of their own, microbatches pipelined between them, data reordered.

    distflow run pipelines/vlm.py --nproc 4                                  # monolithic
    distflow run pipelines/vlm.py --nproc 4 placement=disaggregated reorder=both

Data: ``distflow.multimodal.digits``, generated digit images (1-``max_images`` per
sample, sides 8-26 px) with questions such as "what digits, left to right?" -> "3 7 1".
Model: ``distflow.models.vlm``, a ViT-style patch encoder + projector (the *tower*) and a
decoder LM reading the image tokens at ``IMAGE`` placeholders.

One step, ``batch`` samples split into ``microbatches`` consecutive microbatches:

    preprocess (decode, resize, patchify, tokenize)  --patches-->  encode (tower forward)
        --text-------------------------------------------------->  llm (forward + backward)
    encode --embeds--> llm --grads (d loss / d image tokens)--> encode_bwd (tower backward)
    llm: optimizer step of the LLM;  encode_bwd: optimizer step of the tower
    every eval_every steps: encode_bwd forwards the held-out images --> evaluate (exact match)

Every arrow is a ``ctx.streams`` edge (runtime/stream.py): each microbatch is sent the
moment it is ready, so the encoder group forwards microbatch i+1 while the LLM group
trains on microbatch i (forward + backward at once, 1F1B on the LLM side); after its
last forward the encoder runs each microbatch's backward as soon as that gradient is
back (so it holds the activations of a whole step's microbatches). Who sends what to whom is ``plan_step``, a pure function of (params,
step, group ranks) that every rank computes alike: no coordinator, and each receiver
knows exactly whom it waits for.

``placement=``:

- ``monolithic`` (default): every worker is in every group and handles its samples end to
  end (preprocessing inline, tower and LLM, data parallel): the Megatron-style baseline.
  All its stream messages go to itself (no socket, no copy).
- ``disaggregated``: groups of their own, ``groups.preprocess`` (default 1),
  ``groups.encoder`` (default a quarter of the rest) and ``groups.llm`` (the rest);
  activations and embedding gradients move peer-to-peer over the data plane.

``reorder=none|intra|inter|both`` (``distflow.multimodal.reorder``): ``intra`` assigns a
microbatch's samples to the ranks of each group by LPT on their cost (images for
preprocessing, image patches for the encoder, tokens for the LLM) instead of round-robin; ``inter`` orders the microbatches to
shrink the pipeline's warm-up and cool-down bubbles. Neither changes the math: the loss is
a sum over the step's answer tokens divided by their (planned) count, and gradients are
summed over each group before the optimizer step, so every placement and ordering gives
the same losses up to float summation order.

Metrics: ``loss`` (train, per answer token), ``eval/exact_match`` (held-out, a sample
counts when greedy decoding would give its whole answer), ``busy_s/<group>`` (compute time of
a rank of the group in the step, averaged over its ranks) and ``util/<group>`` (busy time /
the rank's step period, averaged over the group; logged one step late, with step k + 1), ``comm_s/stream/<stage>`` (time
blocked on stream receives), ``count/samples``, plus the runtime's ``timing_s/*`` and
``comm_s/*``.

Learning: ``align_steps`` (default 200) first steps train on one image per sample
(LLaVA-style stage-1 alignment: with a single image token the LLM has nothing to locate,
so the gradient teaches the tower to encode the digit; from 1-8 images at once the tower
and the LLM's "find image k" attention each waited for the other and held-out exact match
stayed at chance), then on 1-``max_images``. ``lr`` 1e-3 (at 3e-3 the tower did not learn
even single images). Held-out evaluation always uses 1-``max_images`` images. With the
defaults (1500 steps, 4 workers) held-out exact match passes 90% after about 1100-1300
steps, 2.5-3.5 minutes on a 2-core CPU box (benchmarks/RESULTS.md).

``emulate=true`` replaces compute (rendering, preprocessing, encoder, LLM) with timed
waits from a cost model (``cost_*`` keys, seconds; see benchmarks/multimodal.py) while
sending tensors of the small model's shapes: the benchmark's emulated-compute mode.
``pp=P`` (emulated only) splits the LLM into ``P`` pipeline stages on ``P`` consecutive
ranks of the ``llm`` group (Megatron's 1F1B schedule, activations and their gradients
over ``ctx.streams``): in the monolithic layout the first stage of each pipeline also
preprocesses and encodes (Megatron-LM's layout, the encoder in the first stage); in the
disaggregated one the pipelines hold only the LLM. A group size that is not a multiple of
``P`` fails before any worker starts.
"""
from __future__ import annotations

import contextlib
import time
from functools import lru_cache

import torch
from safetensors.torch import load_model, save_model

from distflow import Batch, Pipeline, Stage
from distflow.checkpoint import load_optimizer, save_optimizer
from distflow.models.vlm import build_vlm, pad_images, vlm_loss
from distflow.multimodal import digits as D
from distflow.multimodal.plan import (MAX_IMAGES, REORDER, Plan, check_pp, llm_pipeline,
                                      one_f_one_b, plan_step, sample_costs)


def _groups(ctx) -> dict:
    s = ctx.streams
    return {g: s.ranks(g) for g in ("preprocess", "encoder", "llm")}


def _is_monolithic(groups: dict) -> bool:
    return groups["preprocess"] == groups["encoder"] == groups["llm"]


@lru_cache(maxsize=4)
def _cached_plan(key: tuple, split: str, first: int, n: int, mbs: int, groups_key: tuple) -> Plan:
    p = dict(key)
    groups = dict(groups_key)
    return plan_step(p, split, first, n, mbs, groups, _is_monolithic(groups))


def train_plan(ctx) -> Plan:
    p = ctx.params
    if ctx.step < p["align_steps"]:  # stage-1 alignment: one image per sample
        p = {**p, "max_images": 1}
    g = _groups(ctx)
    return _cached_plan(tuple(sorted(p.items())), "train", ctx.step * p["batch"], p["batch"],
                        p["microbatches"], tuple(sorted(g.items())))


def eval_plan(ctx) -> Plan:
    p = ctx.params
    g = _groups(ctx)
    return _cached_plan(tuple(sorted(p.items())), "heldout", 0, p["eval_samples"],
                        max(1, -(-p["eval_samples"] // max(1, p["batch"] // p["microbatches"]))),
                        tuple(sorted(g.items())))


def is_eval_step(ctx) -> bool:
    p = ctx.params
    last = ctx.step + 1 == ctx.steps
    return p["eval_every"] > 0 and p["eval_samples"] > 0 and ((ctx.step + 1) % p["eval_every"] == 0 or last)


# -- compute accounting: busy time per group, wall time per rank and step ------------------
class _Clock:
    """This rank's step period and compute time per group. A step's period runs from its
    first stage to the next step's first stage, so ``util/<group>`` (busy / period) of
    step k is logged with step k + 1."""
    step, t0 = -1, 0.0
    busy: dict = {}
    last_util: dict = {}


def _enter(ctx) -> None:
    if _Clock.step != ctx.step:
        now = time.perf_counter()
        if _Clock.step == ctx.step - 1 and _Clock.busy:
            period = now - _Clock.t0
            _Clock.last_util = {f"util/{g}": b / period for g, b in _Clock.busy.items()}
            ctx.log(**_Clock.last_util)
        _Clock.step, _Clock.t0, _Clock.busy = ctx.step, now, {}


class _busy:
    """Counts the block as compute of ``group``; with ``emulate``, the block takes
    ``seconds`` of wall time in all (the CPU work inside counts toward it, as in
    benchmarks/scaling_pipeline.py's ``_GpuTime``)."""

    def __init__(self, ctx, group: str, seconds: float = 0.0):
        self.group, self.emulate, self.seconds = group, ctx.params["emulate"], seconds

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.emulate:
            left = self.t0 + self.seconds - time.perf_counter()
            if left > 0:
                time.sleep(left)
        _Clock.busy[self.group] = _Clock.busy.get(self.group, 0.0) + time.perf_counter() - self.t0


def _log_busy(ctx, group: str) -> None:
    ctx.log(**{f"busy_s/{group}": _Clock.busy.get(group, 0.0)})


def _nothing():
    return contextlib.nullcontext()


class _StreamWait:
    def __init__(self, ctx):
        self.ctx, self.w0 = ctx, ctx.streams.wait_s

    def log(self):
        self.ctx.log(**{f"comm_s/stream/{self.ctx.stage}": self.ctx.streams.wait_s - self.w0})


# -- preprocess ----------------------------------------------------------------------------
def _emulated_patches(s) -> list[torch.Tensor]:
    return [torch.zeros(n, D.PATCH * D.PATCH) for n in s.patches]


def _send_parts(ctx, plan: Plan, i: int, mb, edge_img: str, edge_txt: str) -> None:
    """This rank's samples of microbatch ``i``: images to their encoder rank, text to
    their LLM rank."""
    p, me, s = ctx.params, ctx.rank, ctx.streams
    mine = plan.mine(mb, plan.pre, me)
    if not mine:
        return
    images: dict[int, list] = {}
    texts: dict[int, list] = {}
    with _busy(ctx, "preprocess", sum(sample_costs(p, plan.specs[j])[0] for j in mine)):
        for j in mine:
            spec, sid = plan.specs[j], plan.ids[j]
            pats = _emulated_patches(spec) if p["emulate"] else D.preprocess_images(spec)
            images.setdefault(plan.enc[j], []).append((sid, pats))
            ids, targets = D.tokenize(spec)
            texts.setdefault(plan.llm[j], []).append((sid, ids, targets))
        img_parts = {}
        for dst, rows in images.items():
            pats = [x for _, ps in rows for x in ps]
            padded, counts = pad_images(pats, D.MAX_PATCHES)
            ids = [sid * MAX_IMAGES + k for sid, ps in rows for k in range(len(ps))]
            img_parts[dst] = Batch({"patches": padded, "count": counts}, ids, counts)
        txt_parts = {}
        for dst, rows in texts.items():
            ids = torch.full((len(rows), p["context"]), D.PAD, dtype=torch.int64)
            tg = torch.full((len(rows), p["context"]), -100, dtype=torch.int64)
            lens = []
            for r, (_, a, t) in enumerate(rows):
                ids[r, :len(a)], tg[r, :len(t)] = a, t
                lens.append(len(a))
            txt_parts[dst] = Batch({"ids": ids, "targets": tg}, [sid for sid, _, _ in rows], lens)
    for dst, b in img_parts.items():
        s.send(edge_img, ctx.step, i, dst, b)
    for dst, b in txt_parts.items():
        s.send(edge_txt, ctx.step, i, dst, b)


def preprocess(ctx):
    _enter(ctx)
    plan = train_plan(ctx)
    for i, mb in enumerate(plan.order):
        _send_parts(ctx, plan, i, mb, "patches", "text")
    if is_eval_step(ctx):
        ev = eval_plan(ctx)
        for i, mb in enumerate(ev.order):
            _send_parts(ctx, ev, i, mb, "eval_patches", "eval_text")
    _log_busy(ctx, "preprocess")


# -- optimizer shared by the two halves ----------------------------------------------------
class _Trainer:
    """AdamW on one module, gradients summed over its group (``ctx.reducer``)."""

    def __init__(self, ctx, module: torch.nn.Module):
        p = ctx.params
        self.module = module
        self.params = [x for x in module.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=p["lr"], betas=(0.9, 0.98),
                                     weight_decay=p["weight_decay"])
        self.reducer = ctx.reducer

    def step(self, ctx) -> float:
        if ctx.params["emulate"]:  # the group's per-step synchronization, not its cost
            if self.reducer is not None:
                self.reducer.sum(torch.zeros(1))
            return 0.0
        for x in self.params:
            if x.grad is None:
                x.grad = torch.zeros_like(x)
        grads = [x.grad for x in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.reducer is not None:
            flat = self.reducer.sum(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        norm = torch.nn.utils.clip_grad_norm_(self.params, ctx.params["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return float(norm)

    def save(self, ctx, directory) -> None:
        if ctx.dp_rank == 0:
            save_model(self.module, str(directory / "model.safetensors"))
            save_optimizer(self.opt, directory)

    def load(self, ctx, directory) -> None:
        load_model(self.module, str(directory / "model.safetensors"))
        load_optimizer(self.opt, directory)


def _model_kwargs(p: dict) -> dict:
    return dict(enc_dim=p["enc_dim"], enc_layers=p["enc_layers"], llm_hidden=p["hidden"],
                llm_layers=p["layers"], context=p["context"])


# -- encoder side --------------------------------------------------------------------------
class _TowerSide:
    """The tower of this rank, shared by ``encode`` (forward) and ``encode_bwd``."""

    def __init__(self, ctx):
        tower, _ = build_vlm(D.VOCAB, D.MAX_PATCHES, seed=ctx.seed, **_model_kwargs(ctx.params))
        self.tower = tower
        self.trainer = _Trainer(ctx, tower)
        self.saved: dict[int, tuple] = {}  # microbatch -> (outputs, ids)

    @staticmethod
    def of(ctx) -> "_TowerSide":
        return ctx.shared("tower", lambda: _TowerSide(ctx))

    def forward(self, ctx, patches: Batch, grad: bool) -> torch.Tensor:
        p = ctx.params
        secs = p["cost_enc"] * float(patches.lengths.sum())
        with _busy(ctx, "encoder", secs):
            if p["emulate"]:
                return torch.zeros(len(patches), p["hidden"], requires_grad=grad)
            with torch.set_grad_enabled(grad):
                return self.tower(patches["patches"], patches["count"])


def _encode_and_send(ctx, side: _TowerSide, plan: Plan, i: int, mb, edge_in: str, edge_out: str,
                     grad: bool):
    me, s = ctx.rank, ctx.streams
    if not plan.mine(mb, plan.enc, me):
        return None
    patches = s.recv(edge_in, ctx.step, i, plan.senders(mb, plan.pre, plan.enc, me)).sorted()
    out = side.forward(ctx, patches, grad)
    sample = patches.sample_ids // MAX_IMAGES
    llm_of = {plan.ids[j]: plan.llm[j] for j in mb}
    dst = torch.tensor([llm_of[int(x)] for x in sample])
    for d in sorted(set(dst.tolist())):
        rows = torch.nonzero(dst == d).flatten()
        s.send(edge_out, ctx.step, i, d, Batch({"tokens": out[rows]}, patches.sample_ids[rows],
                                              patches.lengths[rows]))
    return out, dst


class Encode:
    holds = {"tower": "train"}

    def __init__(self, ctx):
        self.side = _TowerSide.of(ctx)

    def __call__(self, ctx):
        _enter(ctx)
        wait = _StreamWait(ctx)
        plan = train_plan(ctx)
        self.side.saved = {}
        for i, mb in enumerate(plan.order):
            saved = _encode_and_send(ctx, self.side, plan, i, mb, "patches", "embeds", True)
            if saved is not None:
                self.side.saved[i] = saved
        wait.log()


class EncodeBwd:
    """Backward of each microbatch as its gradient comes back, then the optimizer step;
    on eval steps, the updated tower's held-out image tokens go to ``evaluate``."""

    holds = {"tower": "train"}

    def __init__(self, ctx):
        self.side = _TowerSide.of(ctx)

    def __call__(self, ctx):
        _enter(ctx)
        wait = _StreamWait(ctx)
        plan, s = train_plan(ctx), ctx.streams
        for i, mb in enumerate(plan.order):
            if i not in self.side.saved:
                continue
            out, dst = self.side.saved.pop(i)
            senders = sorted(set(dst.tolist()))
            grads = s.recv("grads", ctx.step, i, senders)  # cat in sender order = send order
            order = torch.cat([torch.nonzero(dst == d).flatten() for d in senders])
            g = torch.empty_like(out)
            g[order] = grads["grad"].to(out.dtype)
            with _busy(ctx, "encoder", 2 * ctx.params["cost_enc"] * float(grads.lengths.sum())):
                if not ctx.params["emulate"]:
                    torch.autograd.backward(out, g)
        with _busy(ctx, "encoder") if not ctx.params["emulate"] else _nothing():
            norm = self.side.trainer.step(ctx)
        ctx.log(**{"tower/grad_norm": norm})
        if is_eval_step(ctx):
            ev = eval_plan(ctx)
            for i, mb in enumerate(ev.order):
                _encode_and_send(ctx, self.side, ev, i, mb, "eval_patches", "eval_embeds", False)
        wait.log()
        _log_busy(ctx, "encoder")

    def save_checkpoint(self, ctx, directory):
        self.side.trainer.save(ctx, directory)

    def load_checkpoint(self, ctx, directory):
        self.side.trainer.load(ctx, directory)


# -- LLM side ------------------------------------------------------------------------------
class _LLMSide:
    def __init__(self, ctx):
        _, self.llm = build_vlm(D.VOCAB, D.MAX_PATCHES, seed=ctx.seed, **_model_kwargs(ctx.params))
        self.trainer = _Trainer(ctx, self.llm)

    @staticmethod
    def of(ctx) -> "_LLMSide":
        return ctx.shared("llm", lambda: _LLMSide(ctx))


def _inputs(ctx, plan: Plan, i: int, mb, edge_txt: str, edge_img: str):
    """(text sorted by sample, image tokens sorted by image id (a leaf), the encoder
    senders, the permutation from arrival to sorted order)."""
    s, me = ctx.streams, ctx.rank
    text = s.recv(edge_txt, ctx.step, i, plan.senders(mb, plan.pre, plan.llm, me)).sorted()
    senders = plan.senders(mb, plan.enc, plan.llm, me)
    img = s.recv(edge_img, ctx.step, i, senders)
    perm = torch.argsort(img.sample_ids)
    return text, img, senders, perm


def _forward(ctx, llm, text: Batch, img: Batch, perm: torch.Tensor, grad: bool):
    tokens = img["tokens"][perm].detach().requires_grad_(grad)
    t = int(text.lengths.max())
    ids, targets = text["ids"][:, :t], text["targets"][:, :t]
    key_mask = torch.arange(t)[None, :] < text.lengths[:, None]
    loss, exact = vlm_loss(llm, ids, targets, key_mask, D.IMAGE, tokens)
    return tokens, loss, exact


class LLM:
    """Forward + backward of each microbatch as soon as its inputs are here; the gradient
    w.r.t. the image tokens goes straight back to the encoder ranks."""

    holds = {"llm": "train"}

    def __init__(self, ctx):
        self.side = _LLMSide.of(ctx)

    def __call__(self, ctx):
        _enter(ctx)
        if ctx.params["pp"] > 1:
            return self._pipelined(ctx)
        wait = _StreamWait(ctx)
        p, plan, me = ctx.params, train_plan(ctx), ctx.rank
        loss_sum, n_tok, n = 0.0, 0, 0
        for i, mb in enumerate(plan.order):
            if not plan.mine(mb, plan.llm, me):
                continue
            text, img, senders, perm = _inputs(ctx, plan, i, mb, "text", "embeds")
            secs = sum(sample_costs(p, plan.specs[j])[2] for j in plan.mine(mb, plan.llm, me))
            with _busy(ctx, "llm", secs):
                if p["emulate"]:
                    g_sorted = torch.zeros_like(img["tokens"])
                else:
                    tokens, loss, _ = _forward(ctx, self.side.llm, text, img, perm, True)
                    (loss / plan.answer_tokens).backward()
                    g_sorted = tokens.grad
                    loss_sum += float(loss.detach())
                g = torch.empty_like(g_sorted)
                g[perm] = g_sorted
            n_tok += int((text["targets"] != -100).sum())
            n += len(text)
            _send_grads(ctx, plan, i, mb, senders, img, g)
        with _busy(ctx, "llm") if not ctx.params["emulate"] else _nothing():
            norm = self.side.trainer.step(ctx)
        if n_tok:
            ctx.log_mean(n_tok, loss=loss_sum / n_tok)
        ctx.log(**{"llm/grad_norm": norm, "count/samples": n})
        wait.log()

    def _pipelined(self, ctx):
        """``pp`` > 1 (emulated only): this rank is one stage of an LLM pipeline and runs
        Megatron's 1F1B schedule (``one_f_one_b``) over the step's microbatches.
        Activations go to the next stage and their gradients to the previous one over
        ``ctx.streams``; the head (stage 0) receives text and image tokens and sends the
        image-token gradients back to the encoder ranks. A stage's forward takes 1/3 and
        its backward 2/3 of its 1/``pp`` share of the samples' LLM cost."""
        wait = _StreamWait(ctx)
        p, plan, s = ctx.params, train_plan(ctx), ctx.streams
        pp = p["pp"]
        stage, pipe = llm_pipeline(s.ranks("llm"), pp, ctx.rank)
        mbs = [(i, mb, plan.mine(mb, plan.llm, pipe[0])) for i, mb in enumerate(plan.order)]
        mbs = [(i, mb, mine, sum(sample_costs(p, plan.specs[j])[2] for j in mine) / pp)
               for i, mb, mine in mbs if mine]
        held: dict[int, tuple] = {}
        n = 0

        def activations(mine):  # one placeholder row per sample
            return Batch({"x": torch.zeros(len(mine), 1)}, [plan.ids[j] for j in mine],
                         [plan.specs[j].seq_len for j in mine])

        def forward(i, mb, mine, cost):
            nonlocal n
            if stage == 0:
                text, img, senders, _ = _inputs(ctx, plan, i, mb, "text", "embeds")
                held[i] = (senders, img)
                n += len(text)
            else:
                s.recv("act", ctx.step, i, [pipe[stage - 1]])
            with _busy(ctx, "llm", cost / 3):  # emulated: the block lasts the modelled time
                pass
            if stage < pp - 1:
                s.send("act", ctx.step, i, pipe[stage + 1], activations(mine))

        def backward(i, mb, mine, cost):
            if stage < pp - 1:
                s.recv("act_grad", ctx.step, i, [pipe[stage + 1]])
            with _busy(ctx, "llm", 2 * cost / 3):
                pass
            if stage > 0:
                s.send("act_grad", ctx.step, i, pipe[stage - 1], activations(mine))
            else:
                senders, img = held.pop(i)
                _send_grads(ctx, plan, i, mb, senders, img, torch.zeros_like(img["tokens"]))

        for kind, k in one_f_one_b(len(mbs), pp, stage):
            (forward if kind == "F" else backward)(*mbs[k])
        self.side.trainer.step(ctx)
        ctx.log(**{"llm/grad_norm": 0.0, "count/samples": n})
        wait.log()


def _send_grads(ctx, plan: Plan, i: int, mb, senders: list[int], img: Batch, g: torch.Tensor) -> None:
    """The gradient w.r.t. the image tokens of microbatch ``i`` back to the encoder ranks
    (rows arrived in sender order; each sender gets its own back)."""
    offset = 0
    for src, size in zip(senders, _arrival_sizes(plan, mb, senders, ctx.rank)):
        rows = slice(offset, offset + size)
        ctx.streams.send("grads", ctx.step, i, src, Batch({"grad": g[rows]}, img.sample_ids[rows],
                                                        img.lengths[rows]))
        offset += size


def _arrival_sizes(plan: Plan, mb, senders: list[int], me: int) -> list[int]:
    """Images each encoder rank sends this LLM rank in a microbatch (in sender order)."""
    return [sum(len(plan.specs[j].digits) for j in mb if plan.llm[j] == me and plan.enc[j] == src)
            for src in senders]


class Evaluate:
    """Held-out exact match of the updated model (every ``eval_every`` steps and the last)."""

    holds = {"llm": "infer"}

    def __init__(self, ctx):
        self.side = _LLMSide.of(ctx)

    def __call__(self, ctx):
        _enter(ctx)
        if is_eval_step(ctx):
            wait = _StreamWait(ctx)
            ev, me = eval_plan(ctx), ctx.rank
            hits, n = 0, 0
            for i, mb in enumerate(ev.order):
                if not ev.mine(mb, ev.llm, me):
                    continue
                text, img, _, perm = _inputs(ctx, ev, i, mb, "eval_text", "eval_embeds")
                with _busy(ctx, "llm"), torch.no_grad():
                    if not ctx.params["emulate"]:
                        _, _, exact = _forward(ctx, self.side.llm, text, img, perm, False)
                        hits += int(exact.sum())
                n += len(text)
            if n:
                ctx.log_mean(n, **{"eval/exact_match": hits / n})
            wait.log()
        _log_busy(ctx, "llm")

    def save_checkpoint(self, ctx, directory):
        self.side.trainer.save(ctx, directory)

    def load_checkpoint(self, ctx, directory):
        self.side.trainer.load(ctx, directory)


# -- placement, checks ---------------------------------------------------------------------
def _monolithic(n: int) -> dict:
    return {"preprocess": n, "encoder": "preprocess", "llm": "preprocess"}


def _disaggregated(n: int) -> dict:
    if n < 3:
        raise ValueError(f"disaggregated placement needs >= 3 workers (preprocess, encoder, "
                         f"llm), got {n}")
    enc = max(1, (n - 1) // 4)
    return {"preprocess": 1, "encoder": enc, "llm": n - 1 - enc}


def check(p: dict) -> None:
    if p["reorder"] not in REORDER:
        raise ValueError(f"reorder must be one of {list(REORDER)}, got {p['reorder']!r}")
    if not 1 <= p["max_images"] <= MAX_IMAGES:
        raise ValueError(f"max_images must be in [1, {MAX_IMAGES}], got {p['max_images']}")
    worst = 1 + p["max_images"] + max(len(q) for q in D.QUESTIONS) + (2 * p["max_images"] - 1) + 1
    if worst > p["context"]:
        raise ValueError(f"a sample with max_images={p['max_images']} images needs up to {worst} "
                         f"tokens ({p['max_images']} image tokens + text) but context={p['context']}")
    if p["pp"] > 1 and not p["emulate"]:
        raise ValueError(f"pp={p['pp']} is emulated only (emulate=true): the CPU model's LLM has "
                         f"{p['layers']} layers and is not split into pipeline stages")
    if p["align_steps"] < 0:
        raise ValueError(f"align_steps must be >= 0, got {p['align_steps']}")
    if p["batch"] < 1 or not 1 <= p["microbatches"] <= p["batch"]:
        raise ValueError(f"need batch >= 1 and 1 <= microbatches <= batch, got batch={p['batch']} "
                         f"microbatches={p['microbatches']}")


def check_groups(p: dict, groups: dict) -> None:
    check_pp(p["pp"], groups["llm"])


pipeline = Pipeline("vlm", [
    Stage("preprocess", preprocess, group="preprocess"),
    Stage("encode", Encode, group="encoder"),
    Stage("llm", LLM, group="llm"),
    Stage("encode_bwd", EncodeBwd, group="encoder"),
    Stage("evaluate", Evaluate, group="llm"),
], params={"batch": 32, "microbatches": 4, "max_images": 8, "context": 64, "enc_dim": 64,
           "enc_layers": 2, "hidden": 64, "layers": 2, "lr": 1e-3, "align_steps": 200,
           "weight_decay": 0.0,
           "grad_clip": 1.0, "reorder": "none", "eval_every": 50, "eval_samples": 256,
           "emulate": False, "cost_pre": 1e-3, "cost_enc": 1e-4, "cost_llm": 1e-4,
           "text_scale": 1.0, "llm_tokens_per_patch": 0, "pp": 1},
   defaults={"placement": "monolithic", "steps": 1500}, check=check, check_groups=check_groups,
   layouts={"monolithic": _monolithic, "disaggregated": _disaggregated})
