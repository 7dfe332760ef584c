"""Where rank 0 sends each step's reduced metrics besides ``metrics.jsonl``: ``logger=``.

``logger=tensorboard`` writes event files to ``OUT/tensorboard`` (``tensorboard --logdir
OUT``) with ``torch.utils.tensorboard``; it needs the ``tensorboard`` package.
``logger=wandb`` logs to Weights & Biases (the ``wandb`` package; project = the
pipeline's name, run name = the run directory's name, config = the resolved run config);
it runs offline, into ``OUT/wandb``, unless ``WANDB_MODE`` or ``WANDB_API_KEY`` is set
(``wandb sync OUT/wandb/offline-run-*`` uploads later). Both: ``logger=tensorboard,wandb``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs


def parse(spec: str) -> list[str]:
    """``"tensorboard,wandb"`` -> names; ValueError naming an unknown or missing one."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; known: {sorted(LOGGERS)} (comma-separated)")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise ValueError(f"logger={name} needs the {LOGGERS[name]!r} package: "
                             f"pip install {LOGGERS[name]}")
    return names


class TensorBoardLogger:
    def __init__(self, out_dir: Path, **_):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, out_dir: Path, name: str = "distflow", config: dict | None = None, **_):
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=name, name=out_dir.name, dir=str(out_dir), config=config or {},
                              mode=mode, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_loggers(spec: str, out_dir: Path, name: str = "distflow", config: dict | None = None) -> list:
    kinds = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
    return [kinds[n](out_dir, name=name, config=config) for n in parse(spec)]
