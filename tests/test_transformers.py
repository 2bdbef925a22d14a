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
