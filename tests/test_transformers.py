"""Hugging Face models on fastattn: attn_implementation="fastattn" against "eager" on outputs and
every parameter gradient (GPT-2, BERT with padded batches, Llama with GQA), and patch / unpatch.
Tiny configs built locally: nothing is downloaded."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import fastattn

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


# ---- decoder families: every keyword they hand the attention function is applied or refused ----

_DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (config class, extra config, the keyword fastattn must refuse, or None when it matches).
# Sliding windows (4) shorter than the sequences (12 + generated tokens), GQA 4:2 everywhere.
_FAMILIES = {
    "llama": ("LlamaConfig", {}, None),
    "mistral-window": ("MistralConfig", dict(sliding_window=4), None),
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1), None),
    "gemma2-softcap": ("Gemma2Config", dict(sliding_window=4), "softcap"),
    "gemma2-window": ("Gemma2Config", dict(sliding_window=4, attn_logit_softcapping=None), None),
    "gemma3-window": ("Gemma3TextConfig", dict(sliding_window=4), None),
    "gpt-oss-sinks": ("GptOssConfig", dict(sliding_window=4, num_local_experts=4,
                                           num_experts_per_tok=2), "s_aux"),
}


def _left_padded_batch(device, lengths=(12, 7), n=12):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (len(lengths), n), generator=g).to(device)
    mask = (torch.arange(n)[None, :] >= n - torch.tensor(lengths)[:, None]).long().to(device)
    return ids * mask, mask  # padding (id 0) on the left, as for generate()


@pytest.mark.parametrize("name", list(_FAMILIES))
def test_decoder_family_matches_eager_or_refuses(name, device):
    """Tiny random Llama, Mistral and Qwen2 (sliding window shorter than the sequence), Gemma 2
    (softcap; and without it, windows), Gemma 3 and GPT-OSS (sinks) on a left-padded batch: with
    "fastattn" the logits, every parameter gradient and greedy generate() tokens equal "eager"'s,
    or the first call raises a ValueError naming the keyword fastattn cannot apply."""
    config_cls, extra, refused = _FAMILIES[name]
    config = getattr(transformers, config_cls)(**_DECODER, **extra)
    eager, ours = _pair(transformers.AutoModelForCausalLM.from_config, config, device)
    ids, mask = _left_padded_batch(device)

    def run(model):
        return model(ids, attention_mask=mask).logits * mask[..., None]

    if refused is not None:
        with pytest.raises(ValueError, match=rf"{refused}=.*use attn_implementation='eager'"):
            run(ours)
    else:
        _compare(eager, ours, run, device, atol=1e-5)
        generated = [m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
                     for m in (ours, eager)]
        assert torch.equal(*generated), generated


class _Attention(torch.nn.Module):
    is_causal = True


def _qkv(device, B=2, H=4, L=6, D=8):
    torch.manual_seed(3)
    return [torch.randn(B, H, L, D, device=device) for _ in range(3)]


@pytest.mark.parametrize("key,value,match", [
    ("softcap", 30.0, "softcap=30.0.*soft-capping"),
    ("s_aux", torch.zeros(4), r"s_aux=<tensor \[4\]>.*sinks"),
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


def test_sliding_window_without_a_mask_is_refused(device):
    q, k, v = _qkv(device)
    with pytest.raises(ValueError, match="sliding_window=3 with 6 keys and no attention_mask"):
        fa_hf.attention_forward(_Attention(), q, k, v, None, sliding_window=3)
    fa_hf.attention_forward(_Attention(), q, k, v, None, sliding_window=6)  # covers every key


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
        ref, _ = sdpa_attention_forward(_Attention(), q, k, v, mask, position_bias=bias)
        (ref_grad,) = torch.autograd.grad(ref.sum(), bias)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_packed_sequences_run_as_varlen(device):
    """cu_seq_lens_q / _k (a packed batch of one row, as DataCollatorWithFlattening gives) attend
    within each sequence only: equal to attention on each sequence alone."""
    q, k, v = _qkv(device, B=1, L=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    with fastattn.record_backends() as ran:
        out, _ = fa_hf.attention_forward(_Attention(), q, k, v, None, cu_seq_lens_q=cu,
                                         cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    assert ("varlen_attention_fwd", fastattn.backend(device)) in ran
    parts = [torch.nn.functional.scaled_dot_product_attention(
        q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=True) for a, b in ((0, 4), (4, 9))]
    torch.testing.assert_close(out, torch.cat(parts, dim=2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sliding_window=3 to packed sequences"):
        fa_hf.attention_forward(_Attention(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                sliding_window=3)


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


def test_submodules_are_attributes_loaded_lazily():
    """fastattn.models / fastattn.integrations.transformers work as attribute paths, and plain
    `import fastattn` imports neither Triton nor transformers."""
    code = ("import sys, fastattn; "
            "assert not {'triton', 'transformers'} & set(sys.modules), sorted(sys.modules); "
            "assert fastattn.models.GPT.__name__ == 'GPT'; "
            "assert callable(fastattn.integrations.transformers.register)")
    subprocess.run([sys.executable, "-c", code], check=True)
