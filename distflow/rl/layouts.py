"""Default worker-group sizes of the built-in RL pipelines for each placement strategy
(a function of WORLD_SIZE; ``groups.<name>=`` on the command line overrides any)."""
from __future__ import annotations


def interleaved(world_size: int) -> dict[str, int | str]:
    """Reference and reward models on workers of their own, running while the policy's
    workers generate and train: actor = N - 2, ref = 1, reward = 1 (N >= 3)."""
    if world_size < 3:
        raise ValueError(f"interleaved placement needs >= 3 workers (actor, ref, reward), "
                         f"got {world_size}")
    return {"rollout": "actor", "actor": world_size - 2, "critic": "actor", "ref": 1, "reward": 1}


def disaggregated(world_size: int) -> dict[str, int | str]:
    """Generation on half the workers with its own policy copy, training (with the
    reference, reward and critic) on the other half."""
    if world_size < 2:
        raise ValueError(f"disaggregated placement needs >= 2 workers, got {world_size}")
    return {"rollout": world_size // 2, "actor": world_size - world_size // 2,
            "critic": "actor", "ref": "actor", "reward": "actor"}


def for_groups(groups: set[str]):
    """The layouts restricted to the groups a pipeline uses."""
    def restrict(layout):
        return lambda n: {g: v for g, v in layout(n).items() if g in groups}
    return {"interleaved": restrict(interleaved), "disaggregated": restrict(disaggregated)}
