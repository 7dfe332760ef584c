"""RL post-training stages (rollout, reward, reference, values, advantages, updates) that
the built-in pipelines in ``pipelines/`` wire into DAGs."""
