"""RL advantage estimators, KL estimators and losses as pure tensor functions.

Each family is a plain dict from a config string to a function (the verl
``core_algos`` idea)::

    adv, ret = get_advantage(cfg.adv)(rewards, mask, group_ids)      # grpo / rloo / ...
    kl = kl_divergence(logp, ref_logp, "low_var_kl")
    loss, stats = get_policy_loss("ppo_clip")(logp, old_logp, adv, mask, agg="token-mean")

See ``distflow.algos.advantages`` for the estimator signatures and shapes.
"""
from distflow.algos.advantages import (ADVANTAGES, gae, get_advantage, grpo,
                                       place_at_last_token, reinforce_pp, rloo)
from distflow.algos.core import (AGG_MODES, aggregate, masked_mean, masked_sum, masked_var,
                                 masked_whiten)
from distflow.algos.kl import (KL_ESTIMATORS, get_kl_estimator, kl_divergence, kl_k1, kl_k2,
                               kl_k3)
from distflow.algos.losses import (LOGITS_BUDGET, POLICY_LOSSES, entropy_from_logits,
                                   get_policy_loss, logprobs_from_hidden, logprobs_from_logits,
                                   ppo_policy_loss, value_loss)

__all__ = [
    "ADVANTAGES", "AGG_MODES", "KL_ESTIMATORS", "LOGITS_BUDGET", "POLICY_LOSSES",
    "aggregate", "entropy_from_logits", "gae", "get_advantage", "get_kl_estimator",
    "get_policy_loss", "grpo", "kl_divergence", "kl_k1", "kl_k2", "kl_k3",
    "logprobs_from_hidden", "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var",
    "masked_whiten", "place_at_last_token", "ppo_policy_loss", "reinforce_pp", "rloo", "value_loss",
]
