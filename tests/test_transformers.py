"""Hugging Face models on fastattn: attn_implementation="fastattn" against "eager" on outputs and
every parameter gradient (GPT-2, BERT with padded batches, Llama with GQA; Mistral, Qwen2,
Gemma 2 / 3 and GPT-OSS with sliding windows, softcap and sinks, generate() and a KV cache too),
generate()'s decode steps on the KV-cache decode op (dynamic and static caches) and the calls it
leaves to the prefill path, the mask builder, and patch / unpatch. Tiny configs built locally:
nothing is downloaded."""

from __future__ import annotations

import copy
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import reference

transformers = pytest.importorskip("transformers")

from fastattn.integrations import transformers as fa_hf  # noqa: E402

fa_hf.register()


def _gpt2_config():
    return transformers.GPT2Config(vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   bos_token_id=0, eos_token_id=0)


def _bert_config():
    return transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=96,
                                   max_position_embeddings=40, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def _llama_config():
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _pair(model_cls, config, device):
    """The same initialisation twice: one model on "eager", one on "fastattn"."""
    torch.manual_seed(0)
    eager = model_cls(copy.deepcopy(config)).to(device)
    ours = model_cls(copy.deepcopy(config)).to(device)
    ours.load_state_dict(eager.state_dict())
    eager.set_attn_implementation("eager")
    ours.set_attn_implementation("fastattn")
    return eager, ours


def _padded_batch(device, lengths=(19, 11, 4), n=19):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (len(lengths), n), generator=g).to(device)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
    return ids, mask


def _compare(eager, ours, run, device, atol=2e-5):
    """run(model) -> a tensor; outputs and every parameter's gradient must match."""
    with fastattn.record_backends() as ran:
        out = run(ours)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
    assert ("attention_fwd", fastattn.backend(device)) in ran
    assert ("attention_bwd", fastattn.backend(device)) in ran
    ref = run(eager)
    (ref.float() * torch.linspace(-1, 1, ref.shape[-1], device=device)).sum().backward()
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    ours_params = dict(ours.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is None:
            assert ours_params[name].grad is None, name
            continue
        torch.testing.assert_close(ours_params[name].grad, p.grad, atol=atol, rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama-gqa"])
def test_model_matches_eager(name, padded, device):
    """GPT-2 (causal), BERT (bidirectional, key padding) and Llama (causal, GQA): outputs and every
    parameter gradient of attn_implementation="fastattn" match "eager"."""
    model_cls, config = {"gpt2": (transformers.GPT2LMHeadModel, _gpt2_config),
                         "bert": (transformers.BertModel, _bert_config),
                         "llama-gqa": (transformers.LlamaForCausalLM, _llama_config)}[name]
    eager, ours = _pair(model_cls, config(), device)
    ids, mask = _padded_batch(device)

    def run(model):
        out = model(ids, attention_mask=mask if padded else None)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        # Outputs at padded positions are not meaningful in either implementation.
        return out * mask[..., None] if padded else out

    _compare(eager, ours, run, device)


# ---- decoder families: softcap, sinks and sliding windows applied in the kernel ----

_DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (config class, extra config, what the kernel calls get: the set of windows (sliding
# layers (3, 0): the query's key and the 3 before it; full layers unbounded), softcap, sinks).
# Sliding windows (4) shorter than the sequences (12 + generated tokens), GQA 4:2 everywhere;
# Gemma 2's cap at 1.0 on weights 15x the default scale, so that capping changes the scores.
_SLIDING, _FULL, _BOTH = {(3, 0)}, {(-1, -1)}, {(3, 0), (-1, -1)}
_FAMILIES = {
    "llama": ("LlamaConfig", {}, (_FULL, 0.0, False)),
    "mistral-window": ("MistralConfig", dict(sliding_window=4), (_SLIDING, 0.0, False)),
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1), (_BOTH, 0.0, False)),
    "gemma2-softcap": ("Gemma2Config", dict(sliding_window=4, attn_logit_softcapping=1.0,
                                            initializer_range=0.3), (_BOTH, 1.0, False)),
    "gemma3-window": ("Gemma3TextConfig", dict(sliding_window=4), (_SLIDING, 0.0, False)),
    "gpt-oss-sinks": ("GptOssConfig", dict(sliding_window=4, num_local_experts=4,
                                           num_experts_per_tok=2), (_BOTH, 0.0, True)),
}


def _left_padded_batch(device, lengths=(12, 7), n=12):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (len(lengths), n), generator=g).to(device)
    mask = (torch.arange(n)[None, :] >= n - torch.tensor(lengths)[:, None]).long().to(device)
    return ids * mask, mask  # padding (id 0) on the left, as for generate()


def _kernel_calls(monkeypatch) -> list[dict]:
    """What fastattn.scaled_dot_product_attention (op "prefill") and fastattn.kvcache_attention
    (op "decode") get from the integration, call by call: L, S, the mask's shape and the keywords
    (a decode call's key_padding_mask as "mask", its causal as "is_causal")."""
    calls = []
    real_prefill, real_decode = fa_hf.scaled_dot_product_attention, fa_hf.kvcache_attention

    def prefill(q, k, v, attn_mask=None, **kwargs):
        calls.append(dict(kwargs, op="prefill", L=q.shape[-2], S=k.shape[-2],
                          mask=None if attn_mask is None else tuple(attn_mask.shape)))
        return real_prefill(q, k, v, attn_mask=attn_mask, **kwargs)

    def decode(q, k_cache, v_cache, key_padding_mask=None, causal=False, **kwargs):
        calls.append(dict(kwargs, op="decode", L=q.shape[1], S=k_cache.shape[1], is_causal=causal,
                          mask=None if key_padding_mask is None else tuple(key_padding_mask.shape)))
        return real_decode(q, k_cache, v_cache, key_padding_mask=key_padding_mask, causal=causal,
                           **kwargs)

    monkeypatch.setattr(fa_hf, "scaled_dot_product_attention", prefill)
    monkeypatch.setattr(fa_hf, "kvcache_attention", decode)
    return calls


@pytest.mark.parametrize("name", list(_FAMILIES))
def test_decoder_family_matches_eager(name, device, monkeypatch):
    """Tiny random Llama, Mistral and Qwen2 (sliding windows shorter than the sequence), Gemma 2
    (softcap and windows), Gemma 3 and GPT-OSS (sinks and windows) on a left-padded batch: with
    "fastattn" the logits, every parameter gradient (the sinks' too), greedy generate() tokens and
    a continuation through a KV cache (4 queries on 12 keys) equal "eager"'s. The prefills (and
    the training pass) run on scaled_dot_product_attention, generate()'s steps (1 query) and the
    continuation on the decode op (kvcache_attention). Every call gets the window as a window
    with the causal mask and at most a key mask ((B, 1, 1, S) for the prefill, (B, S) for the
    decode op; no dense (B, 1, L, S) mask), bottom-right aligned when L != S, and the cap / the
    sinks."""
    config_cls, extra, (windows, softcap, has_sinks) = _FAMILIES[name]
    config = getattr(transformers, config_cls)(**_DECODER, **extra)
    eager, ours = _pair(transformers.AutoModelForCausalLM.from_config, config, device)
    ids, mask = _left_padded_batch(device)
    calls = _kernel_calls(monkeypatch)

    def run(model):
        return model(ids, attention_mask=mask).logits * mask[..., None]

    _compare(eager, ours, run, device, atol=1e-5)
    generated = [m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
                 for m in (ours, eager)]
    assert torch.equal(*generated), generated
    with torch.no_grad():
        continued = []
        for m in (ours, eager):
            cache = m(ids[:, :8], attention_mask=mask[:, :8], use_cache=True).past_key_values
            continued.append(m(ids[:, 8:], attention_mask=mask, past_key_values=cache).logits)
    torch.testing.assert_close(*continued, atol=1e-5, rtol=1e-4)

    assert calls and all(c["is_causal"] for c in calls), calls
    prefills = [c for c in calls if c["op"] == "prefill"]
    decodes = [c for c in calls if c["op"] == "decode"]
    assert all(c["mask"] in (None, (2, 1, 1, c["S"])) for c in prefills), prefills
    assert all(c["mask"] in (None, (2, c["S"])) for c in decodes), decodes
    assert all(c["bottom_right"] == (c["L"] != c["S"]) for c in prefills), prefills
    assert {c["L"] for c in prefills} == {8, 12}  # the prefills: whole prompts
    assert all(c["L"] < c["S"] for c in decodes)
    assert {c["L"] for c in decodes} == {1, 4}  # generate()'s steps, the continuation
    assert {c["window_size"] for c in calls} == windows, calls
    assert {c["window_size"] for c in decodes} == windows, decodes
    assert {c["softcap"] for c in calls} == {softcap}, calls
    sinks = [m.sinks for m in ours.modules() if hasattr(m, "sinks")]
    assert len(sinks) == (2 if has_sinks else 0)
    assert all(any(c["sinks"] is s for s in sinks) if has_sinks else c["sinks"] is None
               for c in calls)


# ---- generate(): the decode steps on the KV-cache decode op ----

# name -> (model class, config): GPT-2, Llama with GQA 4:2, Gemma 2 with a window of 4 keys
# (shorter than the 9-token prompts) and softcap 1.0 on weights large enough that capping matters.
_GENERATE = {
    "gpt2": (transformers.GPT2LMHeadModel, _gpt2_config),
    "llama-gqa": (transformers.LlamaForCausalLM, _llama_config),
    "gemma2-window-softcap": (
        transformers.Gemma2ForCausalLM,
        lambda: transformers.Gemma2Config(**_DECODER, sliding_window=4,
                                          attn_logit_softcapping=1.0, initializer_range=0.3)),
}


# Caches: generate()'s default (a DynamicCache for the config: Gemma 2's sliding layers keep only
# the window's keys), a static one (S the buffer's length, its unwritten tail masked), and a
# DynamicCache() without the config, whose sliding layers keep every key, so that the decode op
# itself applies the window of 4 to the 9+ keys.
_GENERATE_CASES = ([(name, cache) for name in _GENERATE for cache in ("dynamic", "static")]
                   + [("gemma2-window-softcap", "dynamic-all-keys")])


@pytest.mark.parametrize("name,cache", _GENERATE_CASES)
def test_generate_decode_steps_run_on_the_decode_op(name, cache, device):
    """Greedy generate() on a left-padded batch of 3 with dynamic and static caches: the tokens
    and every step's logits equal "eager"'s; the prefill runs on the prefill kernel (one
    attention_fwd per layer) and every decode step on the decode op (one kvcache_attention_fwd
    per layer and step, none left on the prefill path), on this device's backend (the Triton
    kernels under the interpreter on a CPU)."""
    model_cls, config = _GENERATE[name]
    eager, ours = _pair(model_cls, config(), device)
    ids, mask = _left_padded_batch(device, lengths=(9, 6, 3), n=9)
    new_tokens, layers = 5, ours.config.num_hidden_layers
    options = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
    if cache == "static":
        # disable_compile: on CUDA generate() would torch.compile the forward of a static cache
        options.update(cache_implementation="static", disable_compile=True)
    fresh_cache = (lambda: dict(past_key_values=transformers.DynamicCache())
                   if cache == "dynamic-all-keys" else {})
    with fastattn.record_backends() as ran:
        generated = ours.generate(ids, **options, **fresh_cache())
    expected = eager.generate(ids, **options, **fresh_cache())
    assert generated.sequences.shape == (3, 9 + new_tokens)
    assert torch.equal(generated.sequences, expected.sequences), (generated, expected)
    for step, (ours_logits, eager_logits) in enumerate(zip(generated.logits, expected.logits)):
        torch.testing.assert_close(ours_logits, eager_logits, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"step {step}: {m}")
    backend = fastattn.backend(device)
    attention = [r for r in ran if "attention" in r[0]]
    assert attention.count(("attention_fwd", backend)) == layers, ran
    assert attention.count(("kvcache_attention_fwd", backend)) == layers * (new_tokens - 1), ran
    assert len(attention) == layers * new_tokens, ran


def _tagged_key_mask(keys: torch.Tensor, window) -> torch.Tensor:
    """A (B, S) key mask as fa_hf.attention_mask() makes it for a causal pattern."""
    setattr(keys, fa_hf._CAUSAL_SPEC, (window, True))
    return keys


def test_decode_step_matches_the_reference(device):
    """Decode calls, no gradient: 3 queries on 9 keys with the builder's (B, S) key mask, window
    4, softcap and sinks, and 1 query on a static cache's dense (B, 1, 1, S) mask (holes in the
    middle, the unwritten tail hidden): the decode op's result equals the float64 reference's
    (causal, window and key mask bottom-right aligned)."""
    torch.manual_seed(5)
    q = torch.randn(2, 4, 3, 8, device=device)
    k, v = (torch.randn(2, 2, 9, 8, device=device) for _ in range(2))
    sinks = torch.randn(4, device=device, requires_grad=True)  # a parameter, as GPT-OSS's
    keys = torch.ones(2, 9, dtype=torch.bool, device=device)
    keys[1, :4] = False  # left padding
    backend = fastattn.backend(device)
    with torch.no_grad(), fastattn.record_backends() as ran:
        out, _ = fa_hf.attention_forward(_Attention(), q, k, v, _tagged_key_mask(keys, 4),
                                         scaling=0.5, softcap=2.0, s_aux=sinks)
    assert ran == [("kvcache_attention_fwd", backend)]
    ref, _ = reference.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), True, 0.5, keys[:, None, None, :], window=(3, 0),
        bottom_right=True, softcap=2.0, sinks=sinks.detach().double())
    torch.testing.assert_close(out, ref.transpose(1, 2).float(), atol=1e-5, rtol=1e-5)

    static = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=device)
    static[..., 7:] = False  # not written yet
    static[0, ..., 2:4] = False
    with torch.no_grad(), fastattn.record_backends() as ran:
        out, _ = fa_hf.attention_forward(_Attention(), q[:, :, :1], k, v, static)
    assert ran == [("kvcache_attention_fwd", backend)]
    ref, _ = reference.scaled_dot_product_attention(q[:, :, :1].double(), k.double(), v.double(),
                                                    attn_mask=static)
    torch.testing.assert_close(out, ref.transpose(1, 2).float(), atol=1e-5, rtol=1e-5)


_FALLBACKS = ["float-mask", "per-head-mask", "per-query-mask", "dropout", "position-bias",
              "grad", "17-queries"]


@pytest.mark.parametrize("case", _FALLBACKS)
def test_decode_calls_the_decode_op_cannot_honour_take_the_prefill_path(case, device):
    """A decoding call (fewer queries than keys) with something the decode op does not apply as
    given (an additive float mask, a bool mask differing per head or per query, dropout,
    position_bias, a gradient, more than 16 queries) runs on scaled_dot_product_attention, with
    that thing honoured: the result (and q's gradient) equals the float64 reference's (dropout:
    the prefill op's own draw from the same seed)."""
    torch.manual_seed(6)
    L = 17 if case == "17-queries" else 2 if case == "per-query-mask" else 1
    q = torch.randn(2, 4, L, 8, device=device, requires_grad=case == "grad")
    k, v = (torch.randn(2, 4, 20, 8, device=device) for _ in range(2))
    mask, kwargs = None, {}
    if case == "float-mask":
        mask = torch.zeros(2, 1, 1, 20, device=device)
        mask[0, ..., :5] = float("-inf")
        mask[1, ..., 3] = -2.0  # not a key mask: an additive bias
    elif case == "per-head-mask":
        mask = torch.rand(2, 4, 1, 20, device=device) > 0.3
    elif case == "per-query-mask":
        mask = torch.rand(2, 1, L, 20, device=device) > 0.3
    elif case == "position-bias":
        kwargs["position_bias"] = torch.randn(1, 4, L, 20, device=device)
    elif case == "dropout":
        kwargs["dropout"] = 0.5
    if mask is not None:
        mask[..., -1] = True  # every row sees a key
    backend = fastattn.backend(device)
    torch.manual_seed(7)
    with torch.set_grad_enabled(case == "grad"), fastattn.record_backends() as ran:
        out, _ = fa_hf.attention_forward(_Attention(), q, k, v, mask, **kwargs)
    assert ("attention_fwd", backend) in ran and ("kvcache_attention_fwd", backend) not in ran
    if case == "dropout":
        torch.manual_seed(7)
        with torch.no_grad():
            ref = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True,
                                                        bottom_right=True).transpose(1, 2)
            plain, _ = fa_hf.attention_forward(_Attention(), q, k, v, None)
        assert torch.equal(out, ref)
        assert not torch.allclose(out, plain)  # the dropout was applied
    else:
        # The integration's reading: a mask holds the whole pattern, else causal bottom-right
        # (plus the additive bias).
        inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        bias = kwargs.get("position_bias")
        ref, _ = reference.scaled_dot_product_attention(
            *inputs, mask is None, attn_mask=mask if bias is None else bias.double(),
            bottom_right=True)
        torch.testing.assert_close(out, ref.transpose(1, 2).float(), atol=1e-5, rtol=1e-5)
        if case == "grad":
            (grad,) = torch.autograd.grad(out.sum(), q)
            (ref_grad,) = torch.autograd.grad(ref.sum(), inputs[0])
            torch.testing.assert_close(grad, ref_grad.float(), atol=1e-5, rtol=1e-5)


class _Attention(torch.nn.Module):
    is_causal = True


def _qkv(device, B=2, H=4, L=6, D=8):
    torch.manual_seed(3)
    return [torch.randn(B, H, L, D, device=device) for _ in range(3)]


@pytest.mark.parametrize("key,value,match", [
    ("output_attentions", True, "output_attentions=True"),
    ("seq_idx", torch.zeros(6, dtype=torch.int32), "seq_idx"),
    ("alibi_slopes", torch.ones(4), "alibi_slopes.*does not know this keyword"),
    ("some_new_flag", 1, "some_new_flag=1.*does not know this keyword"),
])
def test_keywords_that_would_change_the_result_are_refused(key, value, match, device):
    q, k, v = _qkv(device)
    value = value.to(device) if isinstance(value, torch.Tensor) else value
    with pytest.raises(ValueError, match=match):
        fa_hf.attention_forward(_Attention(), q, k, v, None, **{key: value})


def test_keywords_without_a_value_or_effect_are_accepted(device):
    """None / False values and model-level flags change nothing: the plain causal result."""
    q, k, v = _qkv(device)
    out, _ = fa_hf.attention_forward(_Attention(), q, k, v, None, softcap=None, s_aux=None,
                                     output_attentions=False, sliding_window=None, use_cache=True,
                                     output_router_logits=True, position_ids=torch.arange(6)[None])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_window_softcap_and_sinks_are_applied_in_the_kernel(causal, device):
    """sliding_window, softcap and s_aux on q, k, v without a mask, 5 queries on 9 keys (a
    decoding chunk): the output and the gradients of q, k, v and the sinks equal the float64
    reference's with the window (W - 1, 0) causal, (W - 1, W - 1) not, bottom-right aligned."""
    torch.manual_seed(4)
    q = torch.randn(2, 4, 5, 8, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, device=device, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, device=device, requires_grad=True)
    module = _Attention()
    module.is_causal = causal
    with fastattn.record_backends() as ran:
        out, _ = fa_hf.attention_forward(module, q, k, v, None, scaling=0.5, sliding_window=3,
                                         softcap=2.0, s_aux=sinks)
        grads = torch.autograd.grad(out.sum(), (q, k, v, sinks))
    assert {("attention_fwd", fastattn.backend(device)),
            ("attention_bwd", fastattn.backend(device))} <= set(ran)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = reference.scaled_dot_product_attention(
        *inputs[:3], causal, 0.5, window=(2, 0 if causal else 2), bottom_right=True, softcap=2.0,
        sinks=inputs[3])
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    torch.testing.assert_close(out, ref.transpose(1, 2).float(), atol=1e-5, rtol=1e-5)
    for name, g, r in zip("q k v sinks".split(), grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_two_dimensional_mask_not_made_by_the_mask_builder_is_refused(device):
    q, k, v = _qkv(device)
    with pytest.raises(ValueError, match=r"2-D attention_mask \[2, 6\].*did not make"):
        fa_hf.attention_forward(_Attention(), q, k, v, torch.ones(2, 6, dtype=torch.bool,
                                                                  device=device))
    with pytest.raises(ValueError, match="sliding_window must be a positive int.*got 0"):
        fa_hf.attention_forward(_Attention(), q, k, v, None, sliding_window=0)


def test_mask_builder_hands_over_causal_patterns_as_key_padding(device):
    """transformers' causal and sliding-window causal patterns with the last query at the last
    key become the (B, S) key-padding mask tagged with the window (sliced at kv_offset, as a
    sliding-window cache's keys are); any other pattern, and a static cache's longer buffer (its
    prefill ends before its last key), get transformers' dense SDPA mask."""
    from transformers import masking_utils as mu

    padding = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool, device=device)
    sizes = dict(batch_size=2, q_length=3, kv_length=6, q_offset=5, kv_offset=2,
                 attention_mask=padding, device=device)
    window = mu.sliding_window_causal_mask_function(4)
    keys = fa_hf.attention_mask(mask_function=window, local_size=4, **sizes)
    assert keys.shape == (2, 6) and getattr(keys, fa_hf._CAUSAL_SPEC) == (4, True)
    torch.testing.assert_close(keys, padding[:, 2:])
    keys = fa_hf.attention_mask(mask_function=mu.causal_mask_function,
                                **{**sizes, "attention_mask": None})
    assert keys.shape == (2, 6) and bool(keys.all())
    assert getattr(keys, fa_hf._CAUSAL_SPEC) == (None, False)
    dense = dict(
        or_pattern=dict(mask_function=mu.or_masks(window, mu.causal_mask_function)),
        chunked=dict(mask_function=mu.chunked_causal_mask_function(
            4, torch.zeros(2, dtype=int, device=device)), local_size=4),
        static_cache=dict(mask_function=mu.causal_mask_function, q_offset=0, kv_offset=0))
    for case, kwargs in dense.items():
        mask = fa_hf.attention_mask(**{**sizes, **kwargs})
        assert mask.shape == (2, 1, 3, 6) and not hasattr(mask, fa_hf._CAUSAL_SPEC), case
        torch.testing.assert_close(mask, mu.sdpa_mask(**{**sizes, **kwargs},
                                                      allow_is_causal_skip=False), msg=case)


def test_position_bias_is_added_as_in_transformers_sdpa(device):
    """T5-style additive position_bias, with a boolean padding mask and with none (causal): the
    result and its gradient (the bias is learned) equal transformers' own SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(device)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=device)
    keep[1, ..., :2] = False
    for mask in (None, keep):
        bias = torch.randn(1, 4, 6, 6, device=device, requires_grad=True)
        with fastattn.record_backends() as ran:
            out, _ = fa_hf.attention_forward(_Attention(), q, k, v, mask, position_bias=bias)
            (grad,) = torch.autograd.grad(out.sum(), bias)
        assert ("attention_fwd", fastattn.backend(device)) in ran
        # torch's math backend: on CUDA its memory-efficient one refuses this bias's gradient
        # ("LSE is not correctly aligned (strideH)", torch 2.11)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            ref, _ = sdpa_attention_forward(_Attention(), q, k, v, mask, position_bias=bias)
            (ref_grad,) = torch.autograd.grad(ref.sum(), bias)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_packed_sequences_run_as_varlen(device):
    """cu_seq_lens_q / _k (a packed batch of one row, as DataCollatorWithFlattening gives) attend
    within each sequence only: equal to attention on each sequence alone; with sliding_window,
    softcap and sinks, to the float64 reference on each sequence."""
    q, k, v = _qkv(device, B=1, L=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    with fastattn.record_backends() as ran:
        out, _ = fa_hf.attention_forward(_Attention(), q, k, v, None, **packed)
    assert ("varlen_attention_fwd", fastattn.backend(device)) in ran
    parts = [torch.nn.functional.scaled_dot_product_attention(
        q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=True)
        for a, b in ((0, 4), (4, 9))]
    torch.testing.assert_close(out, torch.cat(parts, dim=2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    sinks = torch.randn(4, device=device)
    out, _ = fa_hf.attention_forward(_Attention(), q, k, v, None, sliding_window=3, softcap=2.0,
                                     s_aux=sinks, **packed)
    parts = [reference.scaled_dot_product_attention(
        *(t[..., a:b, :].double() for t in (q, k, v)), True, window=(2, 0), softcap=2.0,
        sinks=sinks.double())[0] for a, b in ((0, 4), (4, 9))]
    torch.testing.assert_close(out, torch.cat(parts, dim=2).transpose(1, 2).float(), atol=1e-5,
                               rtol=1e-5)


def test_bert_key_padding_mask_is_passed_in_its_compact_form(device, monkeypatch):
    _, ours = _pair(transformers.BertModel, _bert_config(), device)
    ids, mask = _padded_batch(device)
    shapes = []
    real = fa_hf.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        shapes.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fa_hf, "scaled_dot_product_attention", spy)
    ours(ids, attention_mask=mask)
    assert shapes and all(s == (3, 1, 1, 19) for s in shapes), shapes


@pytest.mark.parametrize("model_cls,config", [
    (lambda c: transformers.GPT2LMHeadModel(c), _gpt2_config),
    (lambda c: transformers.BertModel(c), _bert_config),
])
def test_patch_and_unpatch(model_cls, config, device):
    torch.manual_seed(0)
    model = model_cls(config()).to(device).eval()
    model.set_attn_implementation("eager")
    keys = list(model.state_dict())
    ids, mask = _padded_batch(device)

    def run():
        out = model(ids, attention_mask=mask)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state) * mask[..., None]

    before = run()
    originals = {n: type(m) for n, m in model.named_modules()}
    fastattn.patch(model)
    swapped = {n for n, m in model.named_modules() if type(m).__module__ == "fastattn.nn"}
    assert swapped and all(originals[n] in (torch.nn.LayerNorm, torch.nn.Embedding)
                           for n in swapped)
    assert list(model.state_dict()) == keys
    assert model.config._attn_implementation == "fastattn"
    with fastattn.record_backends() as ran:
        patched = run()
    assert {op for op, _ in ran} >= {"attention_fwd", "norm_fwd", "embedding_fwd"}
    torch.testing.assert_close(patched, before, atol=2e-5, rtol=1e-4)
    fastattn.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == originals
    assert model.config._attn_implementation == "eager"
    with fastattn.record_backends() as ran:
        torch.testing.assert_close(run(), before)
    assert ran == []


def test_import_fastattn_does_not_import_transformers():
    code = "import sys, fastattn; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_refuses_a_clone_root_hiding_hf_kernels():
    """Run from a clone's root (the working directory on sys.path), kernels/ is the top-level
    `kernels` and hides Hugging Face's package of that name, which transformers >= 5.25 imports:
    register() refuses, naming the folder, where transformers would fail inside itself. Without
    the root on sys.path it registers. Where Hugging Face's `kernels` is not installed, nothing is
    hidden and both register."""
    code = "import fastattn.integrations.transformers as t; t.register()"
    root = Path(__file__).resolve().parents[1]
    in_root = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    try:
        importlib.metadata.distribution("kernels")
        hidden = True
    except importlib.metadata.PackageNotFoundError:
        hidden = False
    if hidden:
        assert in_root.returncode != 0
        assert f"{root / 'kernels'} (installed as fastattn.kernels)" in in_root.stderr, in_root.stderr
    else:
        assert in_root.returncode == 0, in_root.stderr
    without_root = subprocess.run([sys.executable, "-c", "import sys; sys.path.remove(''); " + code],
                                  cwd=root, capture_output=True, text=True)
    assert without_root.returncode == 0, without_root.stderr


def test_submodules_are_attributes_loaded_lazily():
    """fastattn.models / fastattn.integrations.transformers work as attribute paths, and plain
    `import fastattn` imports neither Triton nor transformers."""
    code = ("import sys, fastattn; "
            "assert not {'triton', 'transformers'} & set(sys.modules), sorted(sys.modules); "
            "assert fastattn.models.GPT.__name__ == 'GPT'; "
            "assert callable(fastattn.integrations.transformers.register)")
    subprocess.run([sys.executable, "-c", code], check=True)
