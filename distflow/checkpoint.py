"""Checkpoints: safetensors for every tensor, JSON for everything else, written atomically.

A checkpoint of step k is the directory ``checkpoints/step_<k>``. It is first written as
``checkpoints/step_<k>.tmp``, then ``manifest.json`` (the step, and the size and sha256 of
every file) is added and the directory renamed in one ``os.replace``; a crash at any moment
leaves either the previous checkpoints alone or a stray ``.tmp`` that resume ignores.
Resume verifies the manifest: a checkpoint with a missing, truncated or altered file, or
none at all, is skipped with a warning naming it, and the previous one is used.
Nothing is pickled: optimizer state is flattened to named tensors plus a JSON skeleton.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
log = logging.getLogger("distflow.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not match its manifest."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def latest(root: Path, verify: bool = True) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``root`` (its manifest verified), or None.

    Newer directories that fail verification are skipped with a warning naming them."""
    found = sorted(((int(m.group(1)), p) for p in root.glob("step_*")
                    if (m := _STEP.match(p.name)) and p.is_dir()), reverse=True)
    for step, path in found:
        if not verify:
            return step, path
        try:
            check(path, step)
        except CheckpointError as e:
            older = [s for s, _ in found if s < step]
            log.warning("skipping checkpoint %s: %s; %s", path, e,
                        f"falling back to step_{older[0]}" if older else "no older checkpoint")
            continue
        return step, path
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)


def write_manifest(directory: Path, step: int) -> None:
    """``manifest.json``: the step and every file's size and sha256 (relative paths)."""
    files = {f.relative_to(directory).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in _files(directory)}
    write_json(directory / MANIFEST, {"step": step, "files": files})


def check(directory: Path, step: int | None = None) -> dict:
    """Raise ``CheckpointError`` unless ``directory`` matches its manifest (and ``step``)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not isinstance(manifest["step"], int):
            raise TypeError("bad field types")
    except FileNotFoundError:
        raise CheckpointError(f"no {MANIFEST} (incomplete)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable {MANIFEST}: {e}") from None
    if step is not None and manifest["step"] != step:
        raise CheckpointError(f"{MANIFEST} says step {manifest['step']}, directory says {step}")
    for rel, want in sorted(files.items()):
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{rel} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{rel} has {f.stat().st_size} bytes, manifest says {want['bytes']}")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{rel} does not match its sha256 in {MANIFEST}")
    extra = [f.relative_to(directory).as_posix() for f in _files(directory)
             if f.relative_to(directory).as_posix() not in files]
    if extra:
        raise CheckpointError(f"files not in {MANIFEST}: {extra[:5]}")
    return manifest


def staging(root: Path, step: int) -> Path:
    """A clean temporary directory to write step ``step`` into."""
    tmp = root / f"step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int) -> Path:
    """Atomically publish the staged checkpoint of ``step``, with its manifest."""
    tmp, final = root / f"step_{step}.tmp", step_dir(root, step)
    write_manifest(tmp, step)
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
