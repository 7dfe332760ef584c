"""End to end on real workers: a data set's rows through an interrupted and resumed run,
GRPO on a data set with a data-aware reward and greedy evaluation, SFT then RL."""
from __future__ import annotations

import json

import pytest

from harness import PIPELINES, REPO, torchrun

DATA_IDS = PIPELINES / "data_ids.py"


def _rows(out):
    by_step = {}
    for line in (out / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = (r["ids"], r["rows"])  # a re-run step overwrites
    return [by_step[k] for k in sorted(by_step)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interrupted_and_resumed_run_sees_the_same_samples(tmp_path):
    """10 rows, 4 prompts a step: 8 steps cross 3 epoch boundaries. Fails at step 5
    (checkpoints every 2 steps: resume from step 3, mid-epoch), then resumed: the sample
    ids and data rows of every step equal an uninterrupted run's."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"row {i}", "answer": str(i)}) + "\n" for i in range(10)))
    args = (f"data={data}", "placement=split", "groups.rollout=2", "groups.sink=1")
    whole = tmp_path / "whole"
    r = torchrun(DATA_IDS, 3, whole, "steps=8", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    part = tmp_path / "part"
    r = torchrun(DATA_IDS, 3, part, "steps=8", "save_every=2", "fault.rank=1", "fault.step=5",
                 "fault.stage=prompts", "fault.mode=raise", *args)
    assert r.returncode != 0
    assert sorted(p.name for p in (part / "checkpoints").iterdir() if p.is_dir()) == ["step_1", "step_3"]
    state = json.loads((part / "checkpoints" / "step_3" / "prompts" / "data_state.json").read_text())
    assert (state["position"], state["epoch"]) == (16, 1)  # mid-epoch
    r = torchrun(DATA_IDS, 3, part, "steps=8", "resume=true", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = _rows(whole)
    assert _rows(part) == expected
    rows = [row for _, step_rows in expected for row in step_rows[::2]]  # one per group
    for e in range(3):  # each epoch visits every row once, in a different order
        assert sorted(rows[10 * e:10 * e + 10]) == list(range(10))
    assert rows[:10] != rows[10:20]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sft_then_grpo_on_a_data_set_with_eval(tmp_path):
    """SFT writes OUT/model; GRPO starts from it with a TRL-style reward that checks the
    ground-truth column, and evaluates greedily on a held-out file."""
    train, heldout = REPO / "examples/arith/train.jsonl", REPO / "examples/arith/heldout.jsonl"
    sft = tmp_path / "sft"
    r = torchrun(REPO / "pipelines/sft.py", 2, sft, f"data={train}", "steps=3", "batch_size=16")
    assert r.returncode == 0, r.stderr[-2000:]
    loss = [json.loads(line)["sft/loss"] for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert len(loss) == 3 and loss[2] < loss[0]
    assert {p.name for p in (sft / "model").iterdir()} >= {"config.json", "model.safetensors",
                                                           "char_tokenizer.json"}
    reward = tmp_path / "reward.py"
    reward.write_text("def f(prompts, completions, answer, data_source, **kw):\n"
                      "    assert all(s.startswith('arith/') for s in data_source)\n"
                      "    return [float(c.endswith(a)) for c, a in zip(completions, answer)]\n")
    grpo = tmp_path / "grpo"
    r = torchrun(REPO / "pipelines/grpo.py", 2, grpo, f"model={sft / 'model'}", f"data={train}",
                 f"data.eval={heldout}", "eval_every=2", f"reward={reward}:f", "steps=3", "prompts=4",
                 "group_size=2", "max_prompt_len=72", "max_new_tokens=8")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [("eval/accuracy" in m) for m in rows] == [True, False, True]  # steps 0, 2 (last)
    for m in rows[::2]:
        assert 0.0 <= m["eval/accuracy"] <= m["eval/reward/mean"] + 1e-9 <= 1.0 + 1e-9
        assert "reward/mean" in m and m["data/epoch"] == 0
