"""PPO with a critic: GAE advantages, clipped policy and value losses, KL in the reward.

    prompts -> gen -+-> reward -+
                    +-> ref ----+-> adv -> update_critic -> update_actor
                    +-> values -+

    distflow run pipelines/ppo.py                                   # 2 workers, co-located
    distflow run pipelines/ppo.py --nproc 4 placement=interleaved   # ref, reward on own workers
    distflow run pipelines/ppo.py --nproc 4 placement=disaggregated max_staleness=1

The KL to the reference policy is folded into the token rewards (``kl_coef``), as in
the InstructGPT recipe; ``advantage=gae`` with ``gamma``/``lam``. Reward, reference and
values are independent branches: with ``interleaved`` placement the reference and reward
models run on their own workers while the actor/critic workers compute values.
"""
from distflow import Pipeline, Stage
from distflow.data.prompts import DATA_PARAMS
from distflow.rl.checks import check_rl_params, rl_model_params
from distflow.rl.layouts import for_groups
from distflow.rl.stages import (ActorUpdate, Advantages, CriticUpdate, Prompts, RefLogprobs,
                                Reward, Rollout, Values)

pipeline = Pipeline("ppo", [
    Stage("prompts", Prompts, outputs=["prompts"], group="rollout"),
    Stage("gen", Rollout, inputs=["prompts"], outputs=["rollouts"], group="rollout"),
    Stage("reward", Reward, inputs=["rollouts"], outputs=["scored"], group="reward"),
    Stage("ref", RefLogprobs, inputs=["rollouts"], outputs=["with_ref"], group="ref"),
    Stage("values", Values, inputs=["rollouts"], outputs=["with_values"], group="critic"),
    Stage("adv", Advantages, inputs=["rollouts", "scored", "with_ref", "with_values"],
          outputs=["train_batch"], group="critic"),
    Stage("update_critic", CriticUpdate, inputs=["train_batch"], group="critic"),
    Stage("update_actor", ActorUpdate, inputs=["train_batch"], group="actor"),
], params={
    "dtype": "auto",  # float32 | bfloat16 (fp32 master weights) | auto: the checkpoint's
    "model": "tiny", "task": "reverse", "reward": "reverse", "reward_model": "",
    "prompts": 32, "group_size": 8, "max_prompt_len": 3, "max_new_tokens": 3,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "gen_batch": 0,
    "advantage": "gae", "gamma": 1.0, "lam": 0.95, "policy_loss": "ppo_clip",
    "clip_eps": 0.2, "value_clip": 0.2, "ppo_epochs": 1,
    "kl_loss": False, "kl_coef": 0.01, "kl_estimator": "low_var_kl",
    "lr": 3e-3, "critic_lr": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0,
    "micro_batch_tokens": 4096, **DATA_PARAMS,
}, defaults={"steps": 100}, check=check_rl_params, model_params=rl_model_params,
    layouts=for_groups({"rollout", "actor", "critic", "ref", "reward"}),
    weight_sync=("actor", "rollout"))
