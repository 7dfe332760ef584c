"""Users' data sets (JSONL, Parquet, verl's layout), the resumable shuffled cursor,
rewards that see the data, and chat templates."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow.data import Cursor, Dataset, load_rows
from distflow.data.prompts import PromptData
from distflow.models.tokenizer import CharTokenizer
from distflow.rl.tasks import TEXT_ALPHABET, Scorer, extract_answer, math_reward, reward_kind

VERL_ROWS = [{"data_source": "openai/gsm8k",
              "prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
              "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i + 2)},
              "extra_info": {"split": "train", "index": i}} for i in range(5)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": f"q{i}", "answer": f"#### {i}", "n": i} for i in range(7)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(tmp_path / "d.jsonl") == load_rows(tmp_path / "d.parquet") == rows
    ds = Dataset(tmp_path / "d.parquet", prompt_key="question")
    assert (ds.prompt(3), ds.answer(3), ds.answer_key) == ("q3", "#### 3", "answer")


def test_verl_layout_is_recognised_as_is(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), tmp_path / "train.parquet")
    ds = Dataset(tmp_path / "train.parquet")
    assert ds.answer_key == "reward_model.ground_truth"
    assert ds.answer(4) == "6" and ds.prompt(4)[0]["content"] == "What is 4 + 2?"
    data = PromptData({"model": "tiny"}, CharTokenizer(TEXT_ALPHABET), str(tmp_path / "train.parquet"))
    assert data.text(1) == "What is 1 + 2?"  # no template: the messages' contents


@pytest.mark.parametrize("rows, match", [
    ([{"q": "a"}], "no prompt column 'prompt'"),
    ([{"prompt": 3}], "neither text nor chat messages"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], "row 1 has no answer column 'answer'"),
])
def test_bad_rows_are_named(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        Dataset(write_jsonl(tmp_path / "d.jsonl", rows))


def test_a_bad_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not a JSON object"):
        load_rows(tmp_path / "d.jsonl")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 5), cuts=st.lists(st.integers(1, 9), max_size=6),
       stop=st.integers(0, 40))
def test_cursor_resumed_anywhere_continues_the_stream(n, seed, cuts, stop):
    """Every epoch is a permutation of the rows; a cursor restored from any saved position
    (mid-epoch or at a boundary) yields exactly the rows an uninterrupted one does."""
    whole = Cursor(n, seed)
    _, stream = whole.take(stop + sum(cuts))
    for e in range((stop + sum(cuts)) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    a = Cursor(n, seed)
    got = a.take(stop)[1]
    for c in cuts:  # interrupted: a new cursor from the saved state each time
        b = Cursor(n, seed, position=a.state()["position"])
        got += b.take(c)[1]
        a = b
    assert got == stream


def test_cursor_refuses_another_data_set(tmp_path):
    Cursor(5, 0, position=7).save(tmp_path / "s.json", "abc")
    c = Cursor(5, 0)
    c.load(tmp_path / "s.json", "abc")
    assert c.position == 7
    with pytest.raises(ValueError, match="different data set"):
        Cursor(6, 0).load(tmp_path / "s.json", "abc")


# -- rewards -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, answer", [
    ("3+4=7\n#### 7", "7"), ("so it is \\boxed{\\frac{3}{4}} done", "\\frac{3}{4}"),
    ("I count 1,234 then 56 apples", "56"), ("no digits", None), ("#### -2.5", "-2.5"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("completion, truth, reward", [
    ("5+3=8\n#### 8", "#### 8", 1.0), ("the sum is 8.0", "8", 1.0), ("\\boxed{1,000}", 1000, 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("#### 9", "8", 0.0), ("", "8", 0.0), ("#### 8", None, 0.0),
])
def test_math_reward_compares_numbers(completion, truth, reward):
    assert math_reward("gsm8k", completion, truth) == reward


def test_every_column_reaches_the_reward_in_both_conventions():
    seen = {}

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.setdefault("verl", []).append((data_source, solution_str, ground_truth, extra_info["index"]))
        return {"score": float(solution_str == ground_truth)}

    def trl_reward(prompts, completions, ability, reward_model, **kwargs):
        seen["trl"] = (prompts, completions, ability, [r["ground_truth"] for r in reward_model],
                       kwargs["extra_info"], kwargs["ground_truth"])
        return [1.0 if "2" in c else 0.0 for c in completions]

    assert (reward_kind(compute_score), reward_kind(trl_reward), reward_kind(lambda p, c: 0)) == ("verl", "trl", "text")
    rows, answers = VERL_ROWS[:2], ["2", "3"]
    args = (["p0", "p1"], ["2", "x"], rows, answers, [10, 11])
    for fn, want in ((compute_score, [1.0, 0.0]), (trl_reward, [1.0, 0.0])):
        s = Scorer.__new__(Scorer)
        s.name, s.fn, s.kind = fn.__name__, fn, reward_kind(fn)
        assert s.score(*args) == want
    assert seen["verl"] == [("openai/gsm8k", "2", "2", 0), ("openai/gsm8k", "x", "3", 1)]
    assert seen["trl"] == (["p0", "p1"], ["2", "x"], ["math", "math"], ["2", "3"],
                           [{"split": "train", "index": 0}, {"split": "train", "index": 1}], ["2", "3"])


def test_a_reward_that_returns_nonsense_is_named(tmp_path):
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n    return [None] * len(prompts)\n"
                                   "def g(a, b, c):\n    return 0\n")
    with pytest.raises(ValueError, match=r"returned None for sample 7 .*prompt 'p'"):
        Scorer(f"{tmp_path}/r.py:f").score(["p"], ["c"], [None], [None], [7])
    with pytest.raises(ValueError, match="takes 3 required arguments"):
        Scorer(f"{tmp_path}/r.py:g")


# -- chat templates ------------------------------------------------------------------------
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<|system|>\n"
            "{{ m['content'] | trim }}\n{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
            "{% else %}<|assistant|>\n{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}\n"
            "{% endif %}{% endfor %}\n    {% if add_generation_prompt %}<|assistant|>\n{% endif %}"
            "{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}"
            "{{ {'k': 'é'} | tojson }}")


def _checkpoint(directory, in_config: bool):
    """A word-level tokenizer.json with specials, and a chat template, built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "[UNK]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:5])
    tok.add_tokens([chr(c) for c in range(33, 127)] + ["é", "\n", "Hi", "there"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if in_config:
        config["chat_template"] = TEMPLATE
    else:
        (directory / "chat_template.jinja").write_text(TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("in_config", [True, False])
def test_chat_template_gives_the_token_ids_of_transformers(tmp_path, in_config):
    transformers = pytest.importorskip("transformers")
    from distflow.models import load_tokenizer
    d = _checkpoint(tmp_path / "ckpt", in_config)
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "2 + 2 ?"}]
    data_file = write_jsonl(tmp_path / "d.jsonl", [{"prompt": messages}, {"prompt": "Hi"}])
    ours = PromptData({"model": str(d), "chat_template": True}, load_tokenizer(d), str(data_file))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for i, msgs in enumerate([messages, [{"role": "user", "content": "Hi"}]]):
        want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.tokens(i) == list(want)
        assert ours.text(i) == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_chat_template_true_without_a_template_fails(tmp_path):
    from distflow.models import load_tokenizer
    d = _checkpoint(tmp_path / "ckpt", True)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="has no chat template"):
        PromptData({"model": str(d), "chat_template": True}, load_tokenizer(d),
                   str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}])))
