"""GPU paths (run by scripts/gpu_check.sh on a machine with CUDA; skipped elsewhere):
live-row generation and packed scoring on the GPU give what they give on the CPU, and
the bf16 paths run. The bf16 generation path is also exercised on the CPU here."""
import pytest
import torch

from distflow.engines.generation import InferenceEngine
from distflow.engines.sampling import SamplingParams
from distflow.models import DecoderLM, preset

pytestmark = pytest.mark.timeout(300)
EOS, PAD, VOCAB = 1, 0, 32
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(seed=0):
    torch.manual_seed(seed)
    model = DecoderLM(preset("tiny", vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD)).eval()
    model.reset_parameters(std=0.5)
    return model


def _prompts(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_bf16_generation_runs_and_compaction_keeps_its_tokens():
    """The bf16 path (cache in the parameter dtype) on whatever device there is."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(1).to(device=dev, dtype=torch.bfloat16)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    seeds = torch.arange(24)
    live = InferenceEngine(model, 5, PAD).generate(_prompts(), params, row_seeds=seeds)
    assert live.responses.shape[0] == 24 and live.logprobs.dtype == torch.float32
    assert bool((live.lengths >= 1).all()) and int(live.lengths.max()) <= 12
    assert torch.isfinite(live.logprobs).all()


@cuda
def test_cuda_greedy_generation_equals_the_cpu_one():
    model = _model(2)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    cpu = InferenceEngine(model, 5, PAD).generate(_prompts(), params)
    gpu = InferenceEngine(model.cuda(), 5, PAD).generate(_prompts(), params)
    assert torch.equal(cpu.responses, gpu.responses) and torch.equal(cpu.lengths, gpu.lengths)
    assert torch.allclose(cpu.logprobs, gpu.logprobs, atol=1e-4)


@cuda
def test_cuda_packed_scoring_equals_the_padded_forward():
    from test_prefix import _assert_same, _grpo_batch, _logp_and_grads
    model = _model(3).train().cuda()
    batch = _grpo_batch(3, prompts=4, group=6, p=5, r=24)
    lp0, g0 = _logp_and_grads(model, batch, share=False)
    lp1, g1 = _logp_and_grads(model, batch, share=True)
    _assert_same(batch, lp0, g0, lp1, g1, atol=1e-4)
