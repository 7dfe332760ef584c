"""GRPO: group-relative policy optimization as a distflow DAG.

    prompts -> gen -> reward -> ref -> adv -> update_actor

Each prompt is answered ``group_size`` times; advantages are the rewards normalized
within each group; the actor takes a clipped policy-gradient step with a KL-to-reference
loss. By default a tiny Qwen2-shaped model learns the built-in ``reverse`` task
("37=" -> "73") from scratch on the CPU in about a minute.

    distflow run pipelines/grpo.py                                   # 2 workers
    distflow run pipelines/grpo.py --nproc 3 placement=split groups.actor=2 groups.ref=1 groups.reward=ref
    distflow run pipelines/grpo.py model=/path/to/qwen2-checkpoint reward=my_rewards.py:score

The policy lives in the ``actor`` group, shared by generation and update (co-located,
like verl's hybrid engine); reward and reference can sit on their own workers.
"""
from distflow import Pipeline, Stage
from distflow.rl.checks import check_rl_params
from distflow.rl.stages import ActorUpdate, Advantages, Prompts, RefLogprobs, Reward, Rollout

pipeline = Pipeline("grpo", [
    Stage("prompts", Prompts, outputs=["prompts"], group="actor"),
    Stage("gen", Rollout, inputs=["prompts"], outputs=["rollouts"], group="actor"),
    Stage("reward", Reward, inputs=["rollouts"], outputs=["scored"], group="reward"),
    Stage("ref", RefLogprobs, inputs=["scored"], outputs=["with_ref"], group="ref"),
    Stage("adv", Advantages, inputs=["with_ref"], outputs=["train_batch"], group="actor"),
    Stage("update_actor", ActorUpdate, inputs=["train_batch"], group="actor"),
], params={
    "model": "tiny", "task": "reverse", "reward": "reverse", "reward_model": "",
    "prompts": 32, "group_size": 8, "max_prompt_len": 3, "max_new_tokens": 3,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0,
    "advantage": "grpo", "policy_loss": "ppo_clip", "clip_eps": 0.2, "ppo_epochs": 1,
    "kl_loss": True, "kl_coef": 0.001, "kl_estimator": "low_var_kl",
    "lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0, "micro_batch_tokens": 4096,
}, defaults={"steps": 100}, check=check_rl_params)
