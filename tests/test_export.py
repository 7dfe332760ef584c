"""``distflow export``: a checkpoint folder -> transformers' ``from_pretrained``, same logits and
same token ids; the checkpoint itself carries the config and tokenizer (a moved run exports)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_model

from distflow.export import export, save_model_files
from distflow.models import CharTokenizer, DecoderLM, HFTokenizer, load_tokenizer, preset
from harness import REPO

tr = pytest.importorskip("transformers")


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)


def _trainer_checkpoint(run, model, tok, step=3):
    """The folder layout a run writes: weights under distflow's names (TrainEngine.save) plus
    config.json and tokenizer files (ActorUpdate.save_checkpoint)."""
    folder = run / "checkpoints" / f"step_{step}" / "update_actor"
    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    save_model_files(folder, model.config, next(model.parameters()).dtype, tok)
    return folder


def _hf_word_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["the cat sat on the mat", "a dog sat on a log"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>", "<s>"]))
    directory.mkdir(parents=True, exist_ok=True)
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
        "bos_token": "<s>", "unk_token": "<unk>"}))
    return HFTokenizer(directory)


def _logits_match(out_dir, model, vocab):
    hf = tr.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = mask[2, :7] = False  # left padding
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        ours = model.float()(ids, pos, mask)
    assert (ours[mask] - ref[mask]).abs().max().item() < 1e-4
    return hf


def test_export_qwen2_with_char_tokenizer_after_moving_the_run(tmp_path):
    tok = CharTokenizer("0123456789=+ ")
    model = DecoderLM(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)).eval()
    _randomize(model)
    _trainer_checkpoint(tmp_path / "run", model, tok)
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the checkpoint needs nothing outside it

    out = export(tmp_path / "moved", tmp_path / "hf")  # a run dir: its newest checkpoint
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert set(load_file(str(out / "model.safetensors"))) >= {"model.embed_tokens.weight",
                                                              "model.layers.0.self_attn.q_proj.bias"}
    hf = _logits_match(out, model, tok.vocab_size)
    assert hf.config.tie_word_embeddings

    hf_tok = tr.AutoTokenizer.from_pretrained(out)
    for text in ("37=", "12+ 90=0", "9"):
        assert hf_tok.encode(text) == tok.encode(text)
        assert hf_tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id], skip_special_tokens=True) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    assert load_tokenizer(out).encode("37=") == tok.encode("37=")  # and back into distflow


def test_export_llama3_with_hf_tokenizer_in_bf16(tmp_path):
    tok = _hf_word_tokenizer(tmp_path / "base")
    (tmp_path / "base" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = DecoderLM(preset("tiny", vocab_size=tok.vocab_size, model_type="llama", tie_word_embeddings=False,
                             rope_scaling=scaling, eos_token_id=tok.eos_id)).eval()
    _randomize(model, seed=1)
    model = model.to(torch.bfloat16)
    step = _trainer_checkpoint(tmp_path / "run", model, tok).parent
    assert (step / "update_actor" / "chat_template.jinja").is_file()

    out = export(step, tmp_path / "hf")  # a step folder: its one model
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["rope_scaling"]["rope_type"] == "llama3"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert tr.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # dtype "auto" in 5.x
    _logits_match(out, model, tok.vocab_size)
    hf_tok = tr.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("the cat sat", add_special_tokens=False) == tok.encode("the cat sat")
    assert (out / "chat_template.jinja").is_file()

    fp32 = export(step / "update_actor", tmp_path / "fp32", dtype="float32")
    assert {t.dtype for t in load_file(str(fp32 / "model.safetensors")).values()} == {torch.float32}


def test_export_errors_name_the_folders(tmp_path):
    tok = CharTokenizer("01")
    model = DecoderLM(preset("tiny", vocab_size=tok.vocab_size))
    step = _trainer_checkpoint(tmp_path / "run", model, tok).parent
    critic = step / "update_critic"
    shutil.copytree(step / "update_actor", critic)
    with pytest.raises(ValueError, match="holds 2 models: .*update_actor.*update_critic"):
        export(step, tmp_path / "out")
    shutil.rmtree(critic)
    (step / "update_actor" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="without config.json .* --model DIR"):
        export(tmp_path / "run", tmp_path / "out")
    base = tmp_path / "base"
    from distflow.models import save_pretrained
    save_pretrained(model, base)
    tok.save(base)
    assert export(tmp_path / "run", tmp_path / "out", model_dir=base).is_dir()  # --model fills the gap
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "export", str(tmp_path / "nowhere"),
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not a directory" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grpo_in_bf16_then_export(tmp_path):
    """A real run trains in bf16 (fp32 masters in the checkpoint); its checkpoint exports and
    loads in transformers with the logits distflow computes."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(REPO / "pipelines" / "grpo.py"),
                        "--out", str(run), "--steps", "2", "prompts=8", "group_size=4", "dtype=bfloat16"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model 'tiny' in bfloat16 (dtype=bfloat16)" in r.stderr
    folder = run / "checkpoints" / "step_1" / "update_actor"
    assert load_file(str(folder / "model.safetensors"))["norm.weight"].dtype == torch.bfloat16
    masters = load_file(str(folder / "master.safetensors"))
    assert {t.dtype for t in masters.values()} == {torch.float32}
    weights = load_file(str(folder / "model.safetensors"))
    assert torch.equal(masters["norm.weight"].bfloat16(), weights["norm.weight"])

    r = subprocess.run([sys.executable, "-m", "distflow.cli", "export", str(run), str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from distflow.models import load_pretrained
    model = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    _logits_match(tmp_path / "hf", model, model.config.vocab_size)
