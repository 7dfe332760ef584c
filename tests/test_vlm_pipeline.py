"""pipelines/vlm.py end to end (real torchrun workers, sockets, gloo): every placement and
reordering gives the same losses; a resumed run continues exactly."""
import json
import shutil

import pytest

from tests.harness import REPO, torchrun

PIPELINE = REPO / "pipelines" / "vlm.py"
SMALL = ["steps=10", "batch=8", "microbatches=3", "eval_every=5", "eval_samples=12", "seed=3",
         "align_steps=3"]  # steps 0-2 on one image per sample, 3-9 on 1-8


def _run(tmp_path, name, nproc, *extra):
    out = tmp_path / name
    res = torchrun(PIPELINE, nproc, out, *SMALL, *extra, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_monolithic_and_disaggregated_losses_match_with_and_without_reordering(tmp_path):
    _, mono = _run(tmp_path, "mono", 2, "placement=monolithic")
    _, dis = _run(tmp_path, "dis", 3, "placement=disaggregated")
    out, both = _run(tmp_path, "both", 3, "placement=disaggregated", "reorder=both", "save_every=5")
    base = [r["loss"] for r in mono]
    assert len(base) == 10 and base[-1] < base[0]
    for rows in (dis, both):
        for a, b in zip(base, [r["loss"] for r in rows]):
            assert abs(a - b) <= 1e-5 * abs(a)
        assert [r["count/samples"] for r in rows] == [8.0] * 10
        assert rows[-1]["eval/exact_match"] == mono[-1]["eval/exact_match"]
        assert 0 < rows[-1]["util/llm"] <= 1 and rows[-1]["comm_s/stream/llm"] >= 0
    # resume from the step-4 checkpoint of the reordered run: steps 5-9 come out the same
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_9")
    res = torchrun(PIPELINE, 3, resumed, *SMALL, "placement=disaggregated", "reorder=both",
                   "save_every=5", "resume=true", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == list(range(10))
    for a, b in zip(both[5:], again[5:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_emulated_llm_pipelines_run_1f1b_and_take_the_modelled_time(tmp_path):
    """emulate=true pp=2: two LLM ranks form one pipeline (1F1B over the data plane); every
    sample is trained once per step and each LLM rank is busy for its half of the modelled
    LLM time (cost_llm per token, split over the stages)."""
    from distflow.multimodal import digits as D
    from distflow.multimodal.plan import sample_costs
    cost = {"cost_pre": 1e-3, "cost_enc": 1e-3, "cost_llm": 1e-3, "text_scale": 1.0,
            "llm_tokens_per_patch": 0}
    out = tmp_path / "pp"
    res = torchrun(PIPELINE, 4, out, "emulate=true", "pp=2", "steps=3", "batch=8", "microbatches=4",
                   "eval_every=0", "align_steps=0", "seed=1", "placement=disaggregated",
                   "groups.preprocess=1", "groups.encoder=1", "groups.llm=2",
                   *[f"{k}={v}" for k, v in cost.items()], timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["count/samples"] for r in rows] == [8.0] * 3
    p = {"max_images": 8, **cost}
    for r in rows:  # busy_s/llm: mean over the 2 stages = the step's LLM cost / 2
        want = sum(sample_costs(p, D.spec("train", r["step"] * 8 + j, 8))[2] for j in range(8)) / 2
        assert want <= r["busy_s/llm"] <= 1.5 * want, (r["busy_s/llm"], want)
