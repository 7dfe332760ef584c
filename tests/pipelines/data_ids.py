"""Test pipeline: the RL ``Prompts`` source on a data set, and a sink that records which
data rows (and sample ids) every step saw.

    prompts(rollout) -> record(reward, replicated)
"""
import json

from distflow import Pipeline, Stage
from distflow.data.prompts import DATA_PARAMS
from distflow.rl.stages import Prompts


def record(ctx, prompts):
    b = prompts.sorted()
    with open(ctx.out_dir / "rows.jsonl", "a") as f:
        f.write(json.dumps({"step": ctx.step, "ids": b.sample_ids.tolist(),
                            "rows": b["data_row"].tolist()}) + "\n")


pipeline = Pipeline("data_ids", [
    Stage("prompts", Prompts, outputs=["prompts"], group="rollout"),
    Stage("record", record, inputs=["prompts"], group="sink", data_parallel=False),
], params={"model": "tiny", "task": "", "prompts": 4, "group_size": 2, "max_prompt_len": 16,
           **DATA_PARAMS})
