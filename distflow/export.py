"""``distflow export``: a training checkpoint -> a folder ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

A trainer's checkpoint folder (e.g. ``checkpoints/step_<k>/update_actor``) holds the weights
under distflow's parameter names (``model.safetensors``), the HF ``config.json`` of the
model and its tokenizer's files, written by ``save_model_files`` at every checkpoint; so a
run directory can be moved or copied and still exported. Export renames the weights to HF
keys, writes ``config.json`` and copies the tokenizer; a character tokenizer (the built-in
tasks') becomes an equivalent ``tokenizer.json``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distflow.models.config import ModelConfig
from distflow.models.decoder import DecoderLM
from distflow.models.hf import DTYPES, save_pretrained
from distflow.models.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
# The files of an HF checkpoint that describe its tokenizer (and chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def save_model_files(directory: str | Path, config: ModelConfig, dtype: torch.dtype,
                     tokenizer: CharTokenizer | HFTokenizer) -> None:
    """Write what export needs beside the weights into a checkpoint folder: ``config.json``
    (HF format, recording ``dtype``) and the tokenizer's files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf()
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if isinstance(tokenizer, CharTokenizer):
        tokenizer.save(directory)
        return
    for name in TOKENIZER_FILES:
        if name != "config.json" and (tokenizer.directory / name).is_file():
            shutil.copyfile(tokenizer.directory / name, directory / name)


def find_checkpoint(path: str | Path) -> Path:
    """The folder holding a model's ``model.safetensors`` + ``config.json`` under ``path``:
    that folder itself, or the newest ``step_<k>`` of a run directory or of its
    ``checkpoints/``, where exactly one stage (or island) folder must hold a model."""
    from distflow import checkpoint

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (path / WEIGHTS).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = checkpoint.latest(root) if root.is_dir() else None
        if found is not None:
            path = found[1]
            break
    candidates = sorted(p.parent for p in path.rglob(WEIGHTS) if (p.parent / "config.json").is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        weights = sorted(str(p.parent) for p in path.rglob(WEIGHTS))
        hint = (f"; {weights} hold weights without config.json (a checkpoint written before "
                f"distflow kept the model's files: pass --model DIR, the model it started from)"
                if weights else "")
        raise FileNotFoundError(f"no model checkpoint (model.safetensors + config.json) under {path}{hint}")
    raise ValueError(f"{path} holds {len(candidates)} models: {[str(c) for c in candidates]}; "
                     f"pass the one to export")


def export(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
           model_dir: str | Path | None = None) -> Path:
    """Write the model of ``checkpoint_dir`` (see ``find_checkpoint``) as an HF checkpoint
    into ``out_dir``, in its own dtype or ``dtype`` (``float32`` / ``bfloat16``).
    ``model_dir``: where config.json and the tokenizer come from when the checkpoint lacks
    them. Returns ``out_dir``."""
    from safetensors.torch import load_file

    if model_dir is not None:
        src = Path(checkpoint_dir)
        src = src if (src / WEIGHTS).is_file() else _weights_folder(src)
        meta = Path(model_dir)
    else:
        src = meta = find_checkpoint(checkpoint_dir)
    config = ModelConfig.from_pretrained(meta)
    state = load_file(str(src / WEIGHTS))
    model = _assemble(config, state, src)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        model = model.to(DTYPES[dtype])
    out = Path(out_dir)
    save_pretrained(model, out)
    tok = load_tokenizer(meta)
    if isinstance(tok, CharTokenizer):
        char_tokenizer_to_hf(tok, out)
    else:
        for name in TOKENIZER_FILES:
            if (meta / name).is_file():
                shutil.copyfile(meta / name, out / name)
    return out


def _weights_folder(path: Path) -> Path:
    from distflow import checkpoint

    found = checkpoint.latest(path / "checkpoints") or checkpoint.latest(path)
    root = found[1] if found else path
    folders = sorted({p.parent for p in root.rglob(WEIGHTS)})
    if len(folders) != 1:
        raise ValueError(f"{root} holds {len(folders)} model.safetensors: {[str(f) for f in folders]}; "
                         f"pass the one to export")
    return folders[0]


def _assemble(config: ModelConfig, state: dict[str, torch.Tensor], src: Path) -> DecoderLM:
    """A ``DecoderLM`` holding ``state`` (distflow names; a tied head stored under either name)."""
    with torch.device("meta"):
        model = DecoderLM(config)
    if config.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        if "embed_tokens.weight" not in state and head is not None:
            state["embed_tokens.weight"] = head
    expected = {n: p.shape for n, p in model.named_parameters()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{n}: {tuple(state[n].shape)} vs {tuple(expected[n])}" for n in sorted(set(state) & set(expected))
              if tuple(state[n].shape) != tuple(expected[n])]
    if missing or unexpected or shapes:
        raise ValueError(f"{src / WEIGHTS} does not match {src}/config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shapes (checkpoint vs config) {shapes[:5]}")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{src / WEIGHTS} mixes dtypes {sorted(map(str, dtypes))}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def char_tokenizer_to_hf(tok: CharTokenizer, directory: str | Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` that encode exactly as ``tok``: one id per
    character, special tokens dropped on decode. Byte-level (GPT-2's byte-to-character map,
    a BPE with no merges), because transformers 5.x loads the tokenizer of a ``qwen2``
    model as ``Qwen2Tokenizer``, which imposes byte-level pre-tokenization; so the alphabet
    must be ASCII (one byte per character)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    wide = sorted({ch for ch in tok.alphabet if ord(ch) > 127})
    if wide:
        raise ValueError(f"cannot export a character tokenizer with non-ASCII characters {wide}")
    to_symbol = _bytes_to_unicode()
    names = [*CharTokenizer.SPECIALS, *(to_symbol[ord(ch)] for ch in tok.alphabet)]
    hf = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(CharTokenizer.SPECIALS))
    directory = Path(directory)
    hf.save(str(directory / "tokenizer.json"))
    pad, eos, bos = CharTokenizer.SPECIALS
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad, "eos_token": eos,
        "bos_token": bos, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies
    are written in): printable Latin-1 bytes map to themselves, the rest to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out
