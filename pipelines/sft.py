"""SFT: supervised fine-tuning on a data set of prompts and responses, as a distflow DAG.

    batches -> update

Loss on the response tokens only; examples packed into rows of ``seq_len`` tokens, each
attending only to itself (see ``distflow/rl/sft.py``). After the last step the model is
written to ``OUT/model`` in HF format with its tokenizer: the ``model=`` of an RL run.

    distflow run pipelines/sft.py data=examples/arith/train.jsonl --out runs/sft
    distflow run pipelines/grpo.py model=runs/sft/model data=examples/arith/train.jsonl reward=math
"""
from distflow import Pipeline, Stage
from distflow.rl.sft import SFTData, SFTUpdate, check_sft_params

pipeline = Pipeline("sft", [
    Stage("batches", SFTData, outputs=["packed"], group="actor"),
    Stage("update", SFTUpdate, inputs=["packed"], group="actor"),
], params={
    "model": "tiny", "data": "", "data.prompt_key": "prompt", "data.response_key": "response",
    "data.shuffle": True, "chat_template": False,
    "batch_size": 64, "seq_len": 256,
    "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0, "micro_batch_tokens": 8192,
}, defaults={"steps": 400}, check=check_sft_params)
