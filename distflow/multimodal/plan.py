"""The plan of one training step of the VLM pipeline: a pure function of (params, split,
sample range, microbatches, group ranks), so every rank computes the same one without
talking: which samples form each microbatch and in which order the microbatches run
(inter-microbatch reordering), and which rank preprocesses, encodes and trains on each
sample (intra-microbatch reordering). Receivers read from it exactly whom to wait for.

With ``pp`` > 1 the LLM group is cut into pipelines of ``pp`` consecutive ranks (the
LLM's layers split in ``pp`` stages, Megatron-style); a sample's LLM rank is the first
stage (the *head*) of its pipeline, and the other stages follow from it
(``llm_pipeline``). In the monolithic layout the heads also preprocess and encode (the
encoder sits in the first pipeline stage, as in Megatron-LM).
"""
from __future__ import annotations

from dataclasses import dataclass

from distflow.multimodal import digits as D
from distflow.multimodal.reorder import StageCost, assign, order_microbatches

REORDER = ("none", "intra", "inter", "both")
EVAL_ID = 10 ** 9
MAX_IMAGES = 8  # sample ids of images: sample_id * MAX_IMAGES + k


@dataclass(frozen=True)
class Plan:
    specs: tuple            # SampleSpec per position
    ids: tuple              # global sample id per position
    order: tuple            # microbatches in processing order, each a tuple of positions
    pre: tuple              # rank per position
    enc: tuple
    llm: tuple
    answer_tokens: int      # loss normalizer (all answer tokens of the step)

    def senders(self, mb, src: tuple, dst: tuple, me: int) -> list[int]:
        """Sorted ranks that send to ``me`` for microbatch ``mb`` along src -> dst."""
        return sorted({src[j] for j in mb if dst[j] == me})

    def mine(self, mb, of: tuple, me: int) -> list[int]:
        return [j for j in mb if of[j] == me]


def sample_costs(p: dict, s) -> tuple[float, float, float]:
    """(preprocess, encoder forward, LLM forward + backward) seconds of one sample by the
    cost model: ``cost_pre`` per image, ``cost_enc`` per image patch, ``cost_llm`` per LLM
    token. LLM tokens: the sample's text tokens x ``text_scale``, plus one per image
    (this model's image token) and ``llm_tokens_per_patch`` per patch (a configuration
    whose LLM sees every ViT token, e.g. 64 per patch for a 14-px ViT at 8x the
    resolution). Planning uses them always; ``emulate`` also sleeps them."""
    images, patches = len(s.digits), sum(s.patches)
    llm_tokens = (s.seq_len - images) * p["text_scale"] + images + patches * p["llm_tokens_per_patch"]
    return p["cost_pre"] * images, p["cost_enc"] * patches, p["cost_llm"] * llm_tokens


def llm_pipeline(llm_ranks: tuple, pp: int, rank: int) -> tuple[int, tuple]:
    """(stage, ranks of the pipeline) of LLM rank ``rank`` when ``llm_ranks`` form
    pipelines of ``pp`` consecutive ranks."""
    k = llm_ranks.index(rank)
    r = k - k % pp
    return k % pp, tuple(llm_ranks[r:r + pp])


def one_f_one_b(n: int, pp: int, stage: int) -> list[tuple[str, int]]:
    """Megatron's 1F1B order of ``n`` microbatches on pipeline stage ``stage`` of ``pp``:
    ``pp - 1 - stage`` forwards to warm up, then a forward and a backward in turn, then the
    remaining backwards; ``("F", k)`` / ``("B", k)``."""
    warm = min(pp - 1 - stage, n)
    ops = [("F", k) for k in range(warm)]
    for k in range(n - warm):
        ops += [("F", warm + k), ("B", k)]
    return ops + [("B", k) for k in range(n - warm, n)]


def check_pp(pp: int, llm_ranks: tuple) -> None:
    if pp < 1 or len(llm_ranks) % pp:
        raise ValueError(f"pp={pp}: the llm group's {len(llm_ranks)} ranks cannot form pipelines "
                         f"of {pp} stages (its size must be a multiple of pp)")


def plan_step(p: dict, split: str, first: int, n: int, mbs: int, groups: dict,
              monolithic: bool) -> Plan:
    specs = tuple(D.spec(split, first + j, p["max_images"]) for j in range(n))
    intra = p["reorder"] in ("intra", "both")
    inter = p["reorder"] in ("inter", "both")
    size = -(-n // mbs)
    chunks = [list(range(k, min(n, k + size))) for k in range(0, n, size)]
    pp = p.get("pp", 1)
    check_pp(pp, tuple(groups["llm"]))
    heads = tuple(groups["llm"])[::pp]  # first stage of each LLM pipeline
    pre, enc, llm = [0] * n, [0] * n, [0] * n
    costs = []
    for mb in chunks:
        c = [sample_costs(p, specs[j]) for j in mb]
        if monolithic:
            owner = assign([x[0] + 3 * x[1] + x[2] / pp for x in c], len(heads), intra)
            for j, o in zip(mb, owner):
                pre[j] = enc[j] = llm[j] = heads[o]
        else:
            for of, group, k in ((pre, "preprocess", 0), (enc, "encoder", 1), (llm, "llm", 2)):
                ranks = heads if group == "llm" else groups[group]
                owner = assign([x[k] for x in c], len(ranks), intra)
                for j, o in zip(mb, owner):
                    of[j] = ranks[o]
        loads = {}
        for j, x in zip(mb, c):
            loads[("e", enc[j])] = loads.get(("e", enc[j]), 0.0) + x[1]
            loads[("l", llm[j])] = loads.get(("l", llm[j]), 0.0) + x[2]
        ef = max(v for (g, _), v in loads.items() if g == "e")
        costs.append(StageCost(ef, max(v for (g, _), v in loads.items() if g == "l") / pp, 2 * ef))
    order = order_microbatches(costs, inter) if not monolithic else list(range(len(chunks)))
    base = EVAL_ID if split == "heldout" else 0
    return Plan(specs, tuple(base + first + j for j in range(n)),
                tuple(tuple(chunks[i]) for i in order), tuple(pre), tuple(enc), tuple(llm),
                sum(s.answer_tokens for s in specs))
