"""Checkpoints: safetensors for every tensor, JSON for everything else, written atomically.

A checkpoint of step k is the directory ``checkpoints/step_<k>``. It is first written as
``checkpoints/step_<k>.tmp``, then renamed in one ``os.replace``; a crash at any moment
leaves either the previous checkpoints alone or a stray ``.tmp`` that resume ignores.
Nothing is pickled: optimizer state is flattened to named tensors plus a JSON skeleton.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def latest(root: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*")
             if (m := _STEP.match(p.name)) and p.is_dir()]
    return max(found) if found else None


def staging(root: Path, step: int) -> Path:
    """A clean temporary directory to write step ``step`` into."""
    tmp = root / f"step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int) -> Path:
    """Atomically publish the staged checkpoint of ``step``."""
    tmp, final = root / f"step_{step}.tmp", step_dir(root, step)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_optimizer(opt: torch.optim.Optimizer, directory: Path, name: str = "optimizer") -> None:
    """``<name>.safetensors`` (per-parameter state) + ``<name>.json`` (groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(opt: torch.optim.Optimizer, directory: Path, name: str = "optimizer") -> None:
    meta = json.loads((directory / f"{name}.json").read_text())
    state: dict[int, dict] = {}
    for key, value in load_file(str(directory / f"{name}.safetensors")).items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = value
    for key, value in meta["scalars"].items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
