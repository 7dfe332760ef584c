"""GRPO: group-relative policy optimization as a distflow DAG.

    prompts -> gen -+-> reward -+-> adv -> update_actor
                    +-> ref ----+

Each prompt is answered ``group_size`` times; advantages are the rewards normalized
within each group; the actor takes a clipped policy-gradient step with a KL-to-reference
loss. By default a tiny Qwen2-shaped model learns the built-in ``reverse`` task
("37=" -> "73") from scratch on the CPU in about a minute.

    distflow run pipelines/grpo.py                                  # 2 workers, co-located
    distflow run pipelines/grpo.py --nproc 4 placement=interleaved  # ref, reward on own workers
    distflow run pipelines/grpo.py --nproc 4 placement=disaggregated max_staleness=1
    distflow run pipelines/grpo.py model=/path/to/qwen2-checkpoint reward=my_rewards.py:score

Reward and reference have no dependency between them, so with ``interleaved`` placement
they run at the same time on their own workers. With ``disaggregated`` placement
generation runs on its own workers with a copy of the policy that the trainer refreshes
after every update; ``max_staleness=1`` lets generation of step k+1 overlap training of
step k (the clipped ratio uses the log-probs recorded at generation).
"""
from distflow import Pipeline, Stage
from distflow.data.prompts import DATA_PARAMS
from distflow.rl.checks import check_rl_params, rl_model_params
from distflow.rl.layouts import for_groups
from distflow.rl.stages import ActorUpdate, Advantages, Prompts, RefLogprobs, Reward, Rollout

pipeline = Pipeline("grpo", [
    Stage("prompts", Prompts, outputs=["prompts"], group="rollout"),
    Stage("gen", Rollout, inputs=["prompts"], outputs=["rollouts"], group="rollout"),
    Stage("reward", Reward, inputs=["rollouts"], outputs=["scored"], group="reward"),
    Stage("ref", RefLogprobs, inputs=["rollouts"], outputs=["with_ref"], group="ref"),
    Stage("adv", Advantages, inputs=["rollouts", "scored", "with_ref"], outputs=["train_batch"], group="actor"),
    Stage("update_actor", ActorUpdate, inputs=["train_batch"], group="actor"),
], params={
    "dtype": "auto",  # float32 | bfloat16 (fp32 master weights) | auto: the checkpoint's
    "model": "tiny", "task": "reverse", "reward": "reverse", "reward_model": "",
    "prompts": 32, "group_size": 8, "max_prompt_len": 3, "max_new_tokens": 3,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "gen_batch": 0,
    "advantage": "grpo", "policy_loss": "ppo_clip", "clip_eps": 0.2, "ppo_epochs": 1,
    "kl_loss": True, "kl_coef": 0.001, "kl_estimator": "low_var_kl",
    "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0, "micro_batch_tokens": 4096,
    **DATA_PARAMS,  # data=PATH, data.prompt_key, data.answer_key, data.eval, eval_every, ...
}, defaults={"steps": 100}, check=check_rl_params, model_params=rl_model_params,
    layouts=for_groups({"rollout", "actor", "ref", "reward"}), weight_sync=("actor", "rollout"))
