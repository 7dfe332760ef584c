"""The built-in RL pipelines learn; bad RL input fails early and clearly."""
import json
import subprocess
import sys

import pytest
import torch

from distflow import checkpoint
from distflow.models import DecoderLM, preset, save_pretrained
from distflow.models.tokenizer import CharTokenizer
from distflow.rl.checks import check_rl_params
from distflow.rl.tasks import ReverseTask, get_reward
from distflow.runtime.metrics import read_metrics
from harness import REPO

GRPO = REPO / "pipelines" / "grpo.py"


def _params(**kw):
    from distflow.run import load_pipeline
    return {**load_pipeline(str(GRPO)).params, **kw}


def _run(pipeline, out, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "distflow.cli", "run", str(pipeline),
                           "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(330)
@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_builtin_pipeline_learns_on_two_cpu_workers(tmp_path, name):
    r = _run(REPO / "pipelines" / f"{name}.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    first = sum(x["reward/mean"] for x in rows[:10]) / 10
    last = sum(x["reward/mean"] for x in rows[-10:]) / 10
    assert last - first >= 0.3, (first, last)
    assert f"first 10 steps {first:.3f} -> last 10 steps {last:.3f}" in r.stdout
    expected = {"reward/mean", "actor/kl", "actor/pg_loss", "actor/entropy",
                "response_length/mean", "timing_s/gen", "timing_s/update_actor",
                "timing_s/step", "perf/throughput"}
    if name == "ppo":
        expected |= {"critic/vf_loss", "timing_s/values", "timing_s/update_critic"}
    assert expected <= set(rows[-1])
    assert all(x["perf/throughput"] > 0 for x in rows)
    assert json.loads((tmp_path / "run.json").read_text())["world_size"] == 2
    assert (tmp_path / "metrics.png").exists()
    assert checkpoint.latest(tmp_path / "checkpoints")[0] == len(rows) - 1


def test_reverse_reward():
    assert ReverseTask.reward("37=", "73") == 1.0
    assert ReverseTask.reward("37=", "7") == 0.5
    assert ReverseTask.reward("37=", "734") == pytest.approx(2 / 3)
    assert ReverseTask.reward("37=", "") == 0.0


@pytest.mark.parametrize("key,value,match", [
    ("advantage", "bogus", "unknown advantage estimator 'bogus'; known: gae, grpo"),
    ("policy_loss", "nope", "nope"),
    ("kl_estimator", "k9", "k9"),
    ("reward", "nope", "unknown reward 'nope'"),
    ("reward", "missing.py:f", "reward file 'missing.py' does not exist"),
    ("task", "chess", "unknown task 'chess'"),
    ("max_new_tokens", 300, "exceeds the model context of 256"),
    ("max_prompt_len", 1, "prompts of up to 3 tokens, over max_prompt_len=1"),
    ("group_size", 0, "group_size must be >= 1"),
])
def test_bad_rl_params_fail_before_launch(key, value, match):
    with pytest.raises(ValueError, match=match):
        check_rl_params(_params(**{key: value}))


def test_checkpoint_dir_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_rl_params(_params(model=str(tmp_path)))


def test_tokenizer_model_vocabulary_mismatch(tmp_path):
    tok = CharTokenizer(ReverseTask.alphabet)
    save_pretrained(DecoderLM(preset("tiny", vocab_size=tok.vocab_size - 4)), tmp_path)
    tok.save(tmp_path)
    with pytest.raises(ValueError, match=f"tokenizer has {tok.vocab_size} tokens but model"):
        check_rl_params(_params(model=str(tmp_path)))


def test_user_reward_file(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def score(prompt, completion):\n    return float(completion == '1')\n")
    assert get_reward(f"{f}:score")("2=", "1") == 1.0
    with pytest.raises(ValueError, match="has no function 'other'"):
        get_reward(f"{f}:other")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_raising_reward_names_the_sample_and_stage_and_keeps_checkpoints(tmp_path):
    f = tmp_path / "bad_reward.py"
    f.write_text("import os\n"
                 "def score(prompt, completion):\n"
                 "    if os.path.exists(os.environ['DISTFLOW_TEST_FLAG']):\n"
                 "        raise RuntimeError('reward server down')\n"
                 "    return 0.0\n")
    out = tmp_path / "run"
    import os
    os.environ["DISTFLOW_TEST_FLAG"] = str(tmp_path / "flag")
    r = _run(GRPO, out, "--steps", "2", "prompts=4", "group_size=2", f"reward={f}:score")
    assert r.returncode == 0, r.stderr[-2000:]
    before = (out / "checkpoints" / "step_1" / "update_actor" / "model.safetensors").read_bytes()
    (tmp_path / "flag").write_text("")
    r = _run(GRPO, out, "--steps", "4", "resume=true", "prompts=4", "group_size=2",
             f"reward={f}:score")
    del os.environ["DISTFLOW_TEST_FLAG"]
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "stage reward failed" in last and "raised on sample" in last, last
    assert "reward server down" in last
    assert checkpoint.latest(out / "checkpoints")[0] == 1
    after = (out / "checkpoints" / "step_1" / "update_actor" / "model.safetensors").read_bytes()
    assert before == after


def test_neural_reward_model_slot(tmp_path):
    from distflow import Batch
    from distflow.rl.actors import Critic, save_reward_model
    from distflow.rl.stages import RewardModel
    from distflow.runtime.context import StageContext

    torch.manual_seed(0)
    rm = Critic(DecoderLM(preset("tiny", vocab_size=16)))
    torch.nn.init.normal_(rm.value_head.weight)
    save_reward_model(rm, tmp_path)
    ctx = StageContext(stage="reward", rank=0, world_size=1, group="reward", ranks=(0,), dp_rank=0,
                       dp_size=1, params={"reward_model": str(tmp_path)}, seed=0, out_dir=tmp_path)
    stage = RewardModel(ctx)
    prompts = torch.tensor([[0, 5, 6], [4, 5, 6]])
    responses = torch.tensor([[7, 1, 0], [7, 8, 1]])
    b = Batch({"prompts": prompts, "prompt_mask": prompts != 0, "responses": responses,
               "response_mask": torch.tensor([[True, True, False], [True, True, True]])},
              torch.arange(2))
    got = stage(ctx, b)["scored"]["rewards"]
    with torch.no_grad():  # the reference: the value at the last real token, no padding
        want0 = rm(torch.tensor([[5, 6, 7, 1]]), None, None)[0, -1]
        want1 = rm(torch.tensor([[4, 5, 6, 7, 8, 1]]), None, None)[0, -1]
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        from distflow.rl.actors import load_reward_model
        load_reward_model(REPO, "cpu")


def test_gen_batch_gives_each_sample_the_responses_of_one_batch(tmp_path):
    """``gen_batch=B`` (continuous batching in the rollout stage): at most B rows decode at
    once, yet every sample gets the tokens it gets when the whole step decodes together."""
    from distflow.rl.stages import Prompts, Rollout
    from distflow.runtime.context import StageContext

    def rollouts(gen_batch):
        params = _params(task="reverse_ragged", max_prompt_len=66, max_new_tokens=24, prompts=6,
                         group_size=4, gen_batch=gen_batch)
        ctx = StageContext(stage="gen", rank=0, world_size=1, group="rollout", ranks=(0,), dp_rank=0,
                           dp_size=1, params=params, seed=3, out_dir=tmp_path, step=0, models={})
        torch.manual_seed(0)
        rollout = Rollout(ctx)
        batch = rollout(ctx, Prompts(ctx)(ctx)["prompts"])["rollouts"]
        return rollout.infer, batch

    whole_engine, whole = rollouts(0)
    cont_engine, cont = rollouts(5)
    assert whole_engine.max_batch is None and cont_engine.max_batch == 5
    assert cont_engine.cache.capacity == 5 and whole_engine.cache.capacity >= 24
    assert len(set(whole["response_mask"].sum(1).tolist())) >= 3  # ragged: slots were refilled
    assert torch.equal(cont["responses"], whole["responses"])
    assert torch.equal(cont["response_mask"], whole["response_mask"])
    assert torch.allclose(cont["old_logprobs"], whole["old_logprobs"], atol=1e-5)
    with pytest.raises(ValueError, match="gen_batch=-1"):
        check_rl_params(_params(gen_batch=-1))
