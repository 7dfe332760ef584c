"""PPO with a critic: GAE advantages, clipped policy and value losses, KL in the reward.

    prompts -> gen -> reward -> ref -> values -> adv -> update_critic -> update_actor

    distflow run pipelines/ppo.py                                    # 2 workers
    distflow run pipelines/ppo.py --nproc 4 placement=split groups.actor=2 groups.critic=1 groups.ref=1 groups.reward=ref

The KL to the reference policy is folded into the token rewards (``kl_coef``), as in
the InstructGPT recipe; ``advantage=gae`` with ``gamma``/``lam``.
"""
from distflow import Pipeline, Stage
from distflow.rl.checks import check_rl_params
from distflow.rl.stages import (ActorUpdate, Advantages, CriticUpdate, Prompts, RefLogprobs,
                                Reward, Rollout, Values)

pipeline = Pipeline("ppo", [
    Stage("prompts", Prompts, outputs=["prompts"], group="actor"),
    Stage("gen", Rollout, inputs=["prompts"], outputs=["rollouts"], group="actor"),
    Stage("reward", Reward, inputs=["rollouts"], outputs=["scored"], group="reward"),
    Stage("ref", RefLogprobs, inputs=["scored"], outputs=["with_ref"], group="ref"),
    Stage("values", Values, inputs=["with_ref"], outputs=["with_values"], group="critic"),
    Stage("adv", Advantages, inputs=["with_values"], outputs=["train_batch"], group="critic"),
    Stage("update_critic", CriticUpdate, inputs=["train_batch"], group="critic"),
    Stage("update_actor", ActorUpdate, inputs=["train_batch"], group="actor"),
], params={
    "model": "tiny", "task": "reverse", "reward": "reverse", "reward_model": "",
    "prompts": 32, "group_size": 8, "max_prompt_len": 3, "max_new_tokens": 3,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0,
    "advantage": "gae", "gamma": 1.0, "lam": 0.95, "policy_loss": "ppo_clip",
    "clip_eps": 0.2, "value_clip": 0.2, "ppo_epochs": 1,
    "kl_loss": False, "kl_coef": 0.01, "kl_estimator": "low_var_kl",
    "lr": 3e-3, "critic_lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0,
    "micro_batch_tokens": 4096,
}, defaults={"steps": 100}, check=check_rl_params)
