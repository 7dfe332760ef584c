"""SFT: packing with a block-diagonal mask gives the loss of one example per row, and
only response tokens (and EOS) are learned."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distflow.models import DecoderLM, preset
from distflow.rl.sft import SFTExamples, block_mask, check_sft_params, pack

EXAMPLES = [([5, 6, 7], [8, 9, 1]), ([10, 11], [12, 1]), ([13, 14, 15, 16], [17, 18, 19, 1]),
            ([20], [21, 1]), ([3, 4, 5, 6, 7], [9, 1])]


def _loss(model, b):
    logits = model(b["tokens"], b["positions"], block_mask(b["segments"]))
    return F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100, reduction="sum")


def test_packed_loss_equals_one_example_per_row():
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=32)).eval()
    packed = pack(EXAMPLES, 16, 0)
    assert len(packed["tokens"]) == 3  # 6 + 4 + 8 > 16: rows [0, 1], [2, 3], [4]
    alone = sum(_loss(model, pack([ex], 16, 0)) for ex in EXAMPLES)
    torch.testing.assert_close(_loss(model, packed), alone, rtol=1e-5, atol=1e-5)
    # the same as an unpacked, unmasked forward of each example
    plain = 0.0
    for p, r in EXAMPLES:
        ids = torch.tensor([p + r])
        logits = model(ids, torch.arange(ids.shape[1])[None])
        plain = plain + F.cross_entropy(logits[0, len(p) - 1:-1], torch.tensor(r), reduction="sum")
    torch.testing.assert_close(_loss(model, packed), plain, rtol=1e-5, atol=1e-5)


def test_only_response_tokens_are_targets():
    b = pack(EXAMPLES, 16, 0)
    targets = [t for t in b["targets"].flatten().tolist() if t != -100]
    assert targets == [t for _, r in EXAMPLES for t in r]


def test_examples_from_chat_messages_and_errors(tmp_path):
    from distflow.models.tokenizer import CharTokenizer
    from distflow.rl.tasks import TEXT_ALPHABET
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
            {"prompt": "3+4?", "response": "7"}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"model": "tiny", "data": str(f), "data.prompt_key": "prompt", "data.response_key": "response",
              "batch_size": 2, "seq_len": 8}
    tok = CharTokenizer(TEXT_ALPHABET)
    ex = SFTExamples(params, tok)
    assert ex.texts(0) == ("1+1?", "2") and ex.texts(1) == ("3+4?", "7")
    assert ex.tokens(1) == (tok.encode("3+4?"), tok.encode("7") + [tok.eos_id])
    with pytest.raises(ValueError, match=r"row 0 has 4 prompt \+ 2 response tokens, over seq_len=5"):
        check_sft_params({**params, "seq_len": 5})
    with pytest.raises(ValueError, match="sft needs data=PATH"):
        check_sft_params({**params, "data": ""})


def test_sft_prompt_rendered_with_the_chat_template(tmp_path):
    from test_data import TEMPLATE, _checkpoint

    from distflow.data.chat import render_chat
    from distflow.models import load_tokenizer
    d = _checkpoint(tmp_path / "ckpt", in_config=True)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "there"}]}) + "\n")
    params = {"model": str(d), "data": str(f), "data.prompt_key": "prompt", "data.response_key": "response",
              "chat_template": True}
    tok = load_tokenizer(d)
    prompt, response = SFTExamples(params, tok).texts(0)
    assert response == "there"
    assert prompt == render_chat(TEMPLATE, [{"role": "user", "content": "Hi"}], True,
                                 bos_token="<s>", eos_token="</s>")
    assert prompt.startswith("<s><|user|>\nHi\n") and "<|assistant|>" in prompt
