"""GPT.generate on the KV-cache decode op (fastattn.kvcache_attention): greedy tokens equal Hugging
Face's GPT2LMHeadModel.generate from the same weights (one prompt, a left-padded batch, eos), and a
no-cache loop over GPT.forward; the decode op ran on the backend the device selects (the Triton
kernel under the interpreter when the suite sets TRITON_INTERPRET=1); sampling is reproducible,
filters as HF's logits warpers do and draws what HF draws; bad arguments raise naming themselves.

Small sizes: under the interpreter every layer of every step is an interpreted kernel launch.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastattn
from fastattn.models import GPT
from fastattn.models import KVCache
from fastattn.models.gpt import _filtered_logits

transformers = pytest.importorskip("transformers")

VOCAB = 97
BLOCK = 16


@pytest.fixture(scope="module")
def models():
    """A tiny GPT-2 (HF, eager attention) and our GPT with its weights, both in eval mode, on the
    CPU (moved to the test's device by _on). initializer_range 0.3: peaked logits, so greedy
    tokens vary from step to step and the top two logits differ by far more than rounding."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2,
                                  n_head=2, initializer_range=0.3, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.set_attn_implementation("eager")
    return hf, GPT.from_hf(hf).eval()


def _on(models, device):
    hf, ours = models
    return hf.to(device), ours.to(device)


def _prompt(device, b, n, seed=1):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed)).to(device)


def _hf_greedy(hf, ids, new, **kwargs):
    """HF's greedy generate; eos off unless given (the config's eos 0 would stop rows early)."""
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("pad_token_id", 0)
    return hf.generate(ids, max_new_tokens=new, do_sample=False, **kwargs)


@torch.no_grad()
def _greedy_without_cache(model, ids, new):
    """The model re-run on the whole sequence for every new token (no cache, no padding)."""
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _assert_decode_ran(ran, device, calls=None):
    """kvcache_attention_fwd ran, every op on the backend the device selects (on the CPU with
    TRITON_INTERPRET=1: the Triton kernel under the interpreter, not the torch path)."""
    want = fastattn.backend(device)
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        assert want == "triton-interpreter"
    decode = [r for r in ran if r[0] == "kvcache_attention_fwd"]
    assert decode and all(path == want for _, path in decode), ran
    assert all(path == want for _, path in ran), f"another backend ran: {ran}"
    if calls is not None:
        assert len(decode) == calls, decode


@pytest.mark.parametrize("n", [1, 7])
def test_greedy_matches_hf_and_the_no_cache_loop(models, device, n):
    hf, ours = _on(models, device)
    ids, new = _prompt(device, 1, n), 6
    with fastattn.record_backends() as ran:
        out = ours.generate(ids, new)
    # one prefill and new - 1 decode steps, each through every layer
    _assert_decode_ran(ran, device, calls=2 * new)
    assert out.dtype == torch.int64 and out.shape == (1, n + new)
    assert torch.equal(out, _hf_greedy(hf, ids, new))
    assert torch.equal(out, _greedy_without_cache(ours, ids, new))


def test_greedy_left_padded_batch_matches_hf_and_each_prompt_alone(models, device):
    hf, ours = _on(models, device)
    pads = [0, 3, 6]  # the last row: one token
    ids, new = _prompt(device, 3, 7, seed=2), 5
    mask = (torch.arange(7)[None, :] >= torch.tensor(pads)[:, None]).long().to(device)
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0, as a tokenizer pads
    with fastattn.record_backends() as ran:
        out = ours.generate(ids, new, attention_mask=mask)
    _assert_decode_ran(ran, device)
    assert torch.equal(out, _hf_greedy(hf, ids, new, attention_mask=mask))
    assert torch.equal(out[:, :7], ids)
    for b, p in enumerate(pads):
        alone = _greedy_without_cache(ours, ids[b:b + 1, p:], new)
        assert torch.equal(out[b, 7:], alone[0, 7 - p:]), f"row {b}"
    # a bool mask, and an all-ones mask (no padding), give the same as the int mask / no mask
    assert torch.equal(ours.generate(ids, new, attention_mask=mask.bool()), out)
    assert torch.equal(ours.generate(ids[:1], new, attention_mask=mask[:1]),
                       ours.generate(ids[:1], new))


def test_forward_with_a_cache_matches_forward_without(models, device):
    """Chunked prefill (4 tokens, then 2, then 1) into a KVCache gives the logits of one forward
    over the whole sequence, and advances cache.seqlens by each chunk."""
    _, ours = _on(models, device)
    ids = _prompt(device, 2, 7)
    cache = KVCache.empty(ours.config, 2, 9, torch.float32, torch.device(device))
    with torch.inference_mode():
        full = ours(ids)  # (B, N, V)
        chunks = [ours(ids[:, a:b], cache=cache) for a, b in ((0, 4), (4, 6), (6, 7))]
    assert cache.seqlens.tolist() == [7, 7]
    assert cache.k.shape == (2, 2, 9, 2, 16)  # (n_layer, B, S, H, D)
    assert not cache.k[:, :, 7:].any()  # rows past the tokens untouched
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=2e-5, rtol=1e-4)


def test_eos_pads_finished_rows_and_stops_when_all_finished(models, device):
    hf, ours = _on(models, device)
    ids, new = _prompt(device, 3, 4, seed=3), 6
    greedy = ours.generate(ids, new)
    eos = int(greedy[0, 4 + 1])  # row 0 emits it at its second new token
    out = ours.generate(ids, new, eos_token_id=eos, pad_token_id=96)
    want = _hf_greedy(hf, ids, new, eos_token_id=eos, pad_token_id=96)
    assert torch.equal(out, want)
    first = (greedy[0, 4:] == eos).nonzero()[0, 0]
    assert (out[0, 4 + first + 1:] == 96).all() and out[0, 4 + first] == eos
    # one row: generation stops at its eos; the pad defaults to the eos
    one = ours.generate(ids[:1], new, eos_token_id=[eos, 95])
    assert one.shape == (1, 4 + first + 1) and one[0, -1] == eos
    assert torch.equal(one, _hf_greedy(hf, ids[:1], new, eos_token_id=[eos, 95],
                                       pad_token_id=eos))


def test_sampling_is_reproducible_and_top_k_1_is_greedy(models, device):
    _, ours = _on(models, device)
    ids, new = _prompt(device, 2, 3), 5
    greedy = ours.generate(ids, new)

    def sample(seed, **kwargs):
        g = torch.Generator(device=device).manual_seed(seed)
        return ours.generate(ids, new, do_sample=True, generator=g, **kwargs)

    a, b = sample(7, temperature=1.5), sample(7, temperature=1.5)
    assert torch.equal(a, b) and torch.equal(a[:, :3], ids)
    assert a.shape == (2, 3 + new) and 0 <= a.min() and a.max() < VOCAB
    draws = {tuple(sample(s, temperature=1.5).flatten().tolist()) for s in range(4)}
    assert len(draws) > 1, "four seeds drew the same tokens: sampling ignores the generator"
    assert torch.equal(sample(7, top_k=1), greedy)
    assert torch.equal(sample(8, top_p=1e-6), greedy)  # the nucleus: the top token alone


def test_sampling_draws_what_hf_draws(models, device):
    """Same global seed, same logits (to rounding), same warpers in HF's order -> same tokens."""
    hf, ours = _on(models, device)
    ids, new = _prompt(device, 2, 3), 5
    kwargs = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(11)
    out = ours.generate(ids, new, **kwargs)
    torch.manual_seed(11)
    want = hf.generate(ids, max_new_tokens=new, eos_token_id=None, pad_token_id=0, **kwargs)
    assert torch.equal(out, want)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 5, None), (0.7, None, 0.8), (1.3, 10, 0.5), (1.0, 1, 0.99), (2.0, 200, 1.0)])
def test_filtered_logits_match_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    scores[0, :3] = scores[0, 3]  # a tie at the top
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    want = warpers(None, scores.clone())
    got = _filtered_logits(scores.clone(), temperature, top_k, top_p)
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want)
    assert (~got.isinf()).sum(-1).min() >= 1


def test_max_new_tokens_zero_returns_the_prompt(models, device):
    _, ours = _on(models, device)
    ids = _prompt(device, 2, 3)
    out = ours.generate(ids, 0)
    assert torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=14), ValueError, "exceeds the model's block_size 16"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature="1"), TypeError, "temperature must be a float"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(generator=1), TypeError, "generator must be a torch.Generator"),
    (dict(eos_token_id=VOCAB), ValueError, "eos_token_id 97 is out of range"),
    (dict(eos_token_id="x"), TypeError, "eos_token_id must be an int"),
    (dict(eos_token_id=3, pad_token_id=-1), ValueError, "pad_token_id -1 is out of range"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), ValueError, "input_ids must be 2-D"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.int32)), TypeError, "input_ids must have dtype"),
    (dict(attention_mask=torch.ones(1, 2)), ValueError, "attention_mask must have input_ids'"),
    (dict(attention_mask=torch.ones(1, 3)), TypeError, "attention_mask must hold integers"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "must be left-padded"),
    (dict(attention_mask=torch.tensor([[0, 1, 0]])), ValueError, "must be left-padded"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, "a row of padding only"),
    (dict(attention_mask=torch.tensor([[0, 2, 1]])), ValueError, "0s and 1s"),
])
def test_argument_errors_name_the_argument(models, kwargs, error, match):
    _, ours = _on(models, "cpu")
    args = dict(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ours.generate(**args)
