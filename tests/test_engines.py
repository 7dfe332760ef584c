"""Generation and training engines on a tiny random model."""
import pytest
import torch

from distflow.engines.generation import InferenceEngine, left_pad
from distflow.engines.sampling import SamplingParams, filter_logits
from distflow.engines.training import OptimConfig, TrainEngine, micro_batches
from distflow.models import DecoderLM, preset

pytestmark = pytest.mark.timeout(120)
EOS, PAD = 1, 0


def _model(seed=0, vocab=32):
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=vocab, eos_token_id=EOS, pad_token_id=PAD)).eval()


def _prompts(seed=0, n=6, vocab=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def _greedy_reference(model, prompt, max_new, eos=EOS):
    """Full recompute every step, one prompt at a time, no padding, no cache."""
    seq, out, logps = list(prompt), [], []
    for _ in range(max_new):
        logits = model(torch.tensor([seq]))[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        logps.append(float(torch.log_softmax(logits.float(), -1)[tok]))
        if tok == eos:
            break
        seq.append(tok)
    return out, logps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_full_recompute_token_for_token(seed):
    model = _model(seed)
    with torch.no_grad():  # make EOS likely for some rows so stopping is exercised
        model.lm_head.weight[EOS] += 0.15 * model.lm_head.weight.std()
    prompts = _prompts(seed)
    gen = InferenceEngine(model, EOS, PAD).generate(prompts, SamplingParams(temperature=0,
                                                                            max_new_tokens=12))
    for i, p in enumerate(prompts):
        ref, ref_logp = _greedy_reference(model, p, 12)
        n = int(gen.lengths[i])
        assert gen.responses[i, :n].tolist() == ref, i
        assert torch.allclose(gen.logprobs[i, :n], torch.tensor(ref_logp), atol=1e-4)
        assert not gen.response_mask[i, n:].any() and (gen.responses[i, n:] == PAD).all()
        assert (gen.logprobs[i, n:] == 0).all()


def test_top_k_1_and_tiny_top_p_are_greedy():
    model, prompts = _model(3), _prompts(3)
    eng = InferenceEngine(model, EOS, PAD)
    greedy = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6)).responses
    for params in (SamplingParams(top_k=1, max_new_tokens=6), SamplingParams(top_p=1e-6, max_new_tokens=6)):
        got = eng.generate(prompts, params, torch.Generator().manual_seed(0)).responses
        assert torch.equal(got, greedy)


def test_sampled_logprobs_match_the_temperature_scaled_policy():
    model, prompts = _model(4), _prompts(4, n=3)
    out = InferenceEngine(model, EOS, PAD).generate(
        prompts, SamplingParams(temperature=0.7, max_new_tokens=5), torch.Generator().manual_seed(1))
    for i, p in enumerate(prompts):
        n = int(out.lengths[i])
        seq = torch.tensor([p + out.responses[i, :n].tolist()])
        with torch.no_grad():
            logits = model(seq)[0, len(p) - 1:len(p) - 1 + n] / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, out.responses[i, :n, None]).squeeze(-1)
        assert torch.allclose(out.logprobs[i, :n], want, atol=1e-4)


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    probs = torch.softmax(logits, -1)[0]  # [.087, .644, .237, .032]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] < 0.7


def test_bad_generation_inputs():
    eng = InferenceEngine(_model(), EOS, PAD)
    with pytest.raises(ValueError, match="exceeds the model context of 256"):
        eng.generate([[5] * 250], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[3], []], PAD)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_micro_batches_respect_the_token_budget():
    lengths = torch.tensor([3, 4, 2, 9, 1, 1, 5])
    parts = micro_batches(lengths, 7)
    assert [p.tolist() for p in parts] == [[0, 1], [2], [3], [4, 5, 6]]
    assert torch.cat(parts).tolist() == list(range(7))


def _train_once(budget):
    model = _model(5)
    engine = TrainEngine(model, OptimConfig(lr=1e-2, micro_batch_tokens=budget))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 32, (8, 10), generator=g)
    lengths = torch.full((8,), 10)

    def loss_fn(index):
        logits = model(tokens[index])
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[index, 1:, None])
        return -logp.sum(), {"tokens": float(logp.numel())}

    stats = engine.step(8, lengths, loss_fn, normalizer=8 * 9)
    return model, stats


def test_update_does_not_depend_on_micro_batching():
    whole, s1 = _train_once(10_000)
    split, s2 = _train_once(20)  # 2 samples per micro-batch -> 4 accumulation steps
    assert s1["tokens"] == s2["tokens"] == 72
    assert abs(s1["grad_norm"] - s2["grad_norm"]) < 1e-5
    for a, b in zip(whole.parameters(), split.parameters()):  # the accumulated gradients
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert not torch.equal(whole.lm_head.weight, _model(5).lm_head.weight)  # it did train


def test_keyed_sampling_depends_only_on_each_rows_seed():
    model, prompts = _model(6), _prompts(6, n=6)
    eng = InferenceEngine(model, EOS, PAD)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    seeds = torch.arange(100, 106)
    whole = eng.generate(prompts, params, row_seeds=seeds)
    # the same rows in another batch, in another order: the same tokens
    order = [4, 1, 5]
    part = eng.generate([prompts[i] for i in order], params, row_seeds=seeds[order])
    for j, i in enumerate(order):
        n = int(whole.lengths[i])
        assert part.responses[j, :n].tolist() == whole.responses[i, :n].tolist()
    other = eng.generate(prompts, params, row_seeds=seeds + 1000)
    assert not torch.equal(other.responses, whole.responses)


def test_counter_based_uniform_is_uniform():
    from distflow.engines.sampling import uniform
    u = uniform(torch.arange(200_000))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.005


# ---------------------------------------------------------------------------- live-row generation
def _ragged_eos(model, prompts, max_new):
    """An end token for which greedy rows end at many different steps: the token whose
    first occurrence (in a run without any stop) falls on the most distinct steps."""
    free = InferenceEngine(model, -1, PAD).generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
    best, spread = 0, -1
    for tok in range(3, model.config.vocab_size):
        firsts = {int((row == tok).nonzero()[0]) for row in free.responses if bool((row == tok).any())}
        if len(firsts) > spread:
            best, spread = tok, len(firsts)
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_compaction_matches_the_padded_engine_and_full_recompute(seed):
    model = _model(seed)
    model.reset_parameters(std=0.5)  # less degenerate greedy text than the default init
    prompts = _prompts(seed, n=24) + _prompts(seed, n=8)[:4] * 3  # ragged, some repeated
    params = SamplingParams(temperature=0, max_new_tokens=20)
    eos = _ragged_eos(model, prompts, 20)
    live = InferenceEngine(model, eos, PAD).generate(prompts, params)
    padded = InferenceEngine(model, eos, PAD, compact=False).generate(prompts, params)
    lengths = live.lengths.tolist()
    assert len(set(lengths)) >= 4, lengths  # rows really end at different steps
    assert torch.equal(live.responses, padded.responses)
    assert torch.equal(live.response_mask, padded.response_mask)
    assert torch.equal(live.lengths, padded.lengths)
    assert torch.allclose(live.logprobs, padded.logprobs, atol=1e-5)
    for i in (0, 5, 17, 30):
        ref, _ = _greedy_reference(model, prompts[i], 20, eos)
        assert live.responses[i, :lengths[i]].tolist() == ref


def test_compaction_keeps_each_samples_draws():
    model = _model(2)
    with torch.no_grad():  # EOS likely enough that sampled rows end at different steps
        model.lm_head.weight[EOS] += 0.15 * model.lm_head.weight.std()
    prompts = _prompts(2, n=4) * 4  # GRPO-like groups
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=16)
    seeds = torch.arange(500, 516)
    live = InferenceEngine(model, EOS, PAD).generate(prompts, params, row_seeds=seeds)
    padded = InferenceEngine(model, EOS, PAD, compact=False).generate(prompts, params, row_seeds=seeds)
    assert len(set(live.lengths.tolist())) >= 3
    assert torch.equal(live.responses, padded.responses)
    assert torch.allclose(live.logprobs, padded.logprobs, atol=1e-5)


def test_the_kv_cache_is_allocated_once_and_reused():
    model = _model(3)
    eng = InferenceEngine(model, EOS, PAD)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    big, small = _prompts(3, n=12), _prompts(4, n=5)
    first = eng.generate(big, params)
    cache = eng.cache
    again = eng.generate(small, params)   # fits: the same storage, nothing stale leaks in
    assert eng.cache is cache and cache.capacity == 12
    fresh = InferenceEngine(model, EOS, PAD).generate(small, params)
    assert torch.equal(again.responses, fresh.responses)
    assert torch.equal(eng.generate(big, params).responses, first.responses)
    eng.generate(_prompts(5, n=20), params)  # more rows: grows
    assert eng.cache.capacity == 20


def test_kv_cache_move_and_select():
    from distflow.models import KVCache
    model = _model(0)
    c = KVCache.allocate(model.config, 4, 6)
    c.start(4)
    k = torch.arange(4.0)[:, None, None, None].expand(4, 2, 3, c.keys[0].shape[-1])
    for layer in range(c.num_layers):
        c.update(layer, k, k + 10)
    c.advance(3)
    c.move(torch.tensor([3]), torch.tensor([1]), 3)  # row 1 finished: row 3 takes its place
    assert c.batch == 3 and c.keys[0][:, 0, 0, 0].tolist() == [0.0, 3.0, 2.0]
    c.select(torch.tensor([2, 2, 0, 1]))
    assert c.batch == 4 and c.values[1][:, 1, 2, 0].tolist() == [12.0, 12.0, 10.0, 13.0]
    with pytest.raises(ValueError, match="holds 4 rows"):
        c.start(5)


def test_greedy_with_ragged_eos_matches_transformers_generate(tmp_path):
    tr = pytest.importorskip("transformers")
    from distflow.models import load_pretrained
    torch.manual_seed(0)
    config = tr.Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = tr.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else None
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    prompts = _prompts(7, n=20)
    eos = _ragged_eos(ours, prompts, 16)
    gen = InferenceEngine(ours, eos, PAD).generate(prompts, SamplingParams(temperature=0, max_new_tokens=16))
    assert len(set(gen.lengths.tolist())) >= 4
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=16,
                          eos_token_id=eos, pad_token_id=PAD, num_beams=1)[:, ids.shape[1]:]
    for i, n in enumerate(gen.lengths.tolist()):
        assert gen.responses[i, :n].tolist() == ref[i, :n].tolist(), i


@pytest.mark.parametrize("max_batch", [1, 5])
def test_continuous_batching_gives_each_row_what_one_batch_gives(max_batch):
    model = _model(0)
    model.reset_parameters(std=0.5)
    prompts = _prompts(1, n=14)
    eos = _ragged_eos(model, prompts, 12)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    whole = InferenceEngine(model, eos, PAD).generate(prompts, greedy)
    assert len(set(whole.lengths.tolist())) >= 4
    eng = InferenceEngine(model, eos, PAD, max_batch=max_batch)
    cont = eng.generate(prompts, greedy)
    assert eng.cache.capacity == max_batch
    assert torch.equal(cont.responses, whole.responses) and torch.equal(cont.lengths, whole.lengths)
    assert torch.allclose(cont.logprobs, whole.logprobs, atol=1e-5)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=12)
    seeds = torch.arange(40, 54)
    a = InferenceEngine(model, eos, PAD).generate(prompts, sampled, row_seeds=seeds)
    b = eng.generate(prompts, sampled, row_seeds=seeds)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.response_mask, b.response_mask)


def test_prefill_in_length_groups_matches_one_padded_prefill(monkeypatch):
    """Prompts of 2-96 tokens: the prefill runs in groups of similar length (each padded only
    to its own longest), and every row's tokens and log-probs are those of one padded
    prefill, greedy and sampled per row seed."""
    from distflow.engines import generation

    model = _model(1)
    model.reset_parameters(std=0.5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 32, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 97, (64,), generator=g)]
    groups = generation.prefill_groups([len(q) for q in prompts], max(map(len, prompts)))
    assert groups is not None and len(groups) == generation.PREFILL_GROUPS
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(64))
    assert all(width == max(len(prompts[i]) for i in rows.tolist()) for rows, width in groups)
    seeds = torch.arange(100, 164)
    eos = _ragged_eos(model, prompts, 10)
    runs = {}
    for grouped in (True, False):
        monkeypatch.setattr(generation, "PREFILL_MIN_POSITIONS", 4096 if grouped else 10 ** 9)
        eng = InferenceEngine(model, eos, PAD)
        runs[grouped] = [eng.generate(prompts, SamplingParams(temperature=t, max_new_tokens=10),
                                      row_seeds=seeds) for t in (0, 1.0)]
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a.responses, b.responses) and torch.equal(a.lengths, b.lengths)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert len(set(runs[True][0].lengths.tolist())) >= 3  # ragged: rows left the batch
    assert generation.prefill_groups([5] * 64, 5) is None  # nothing to save: one forward
