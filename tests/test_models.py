"""fastattn.models: our GPT and BERT loaded from Hugging Face weights reproduce Hugging Face's
outputs and gradients, and a tiny GPT trains step for step like the same model on torch's ops."""

from __future__ import annotations

import copy

import pytest
import torch

import fastattn
from fastattn.models import GPT, BertConfig, BertModel, GPTConfig

transformers = pytest.importorskip("transformers")



def _hf_gpt2(device):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(device)
    model.set_attn_implementation("eager")
    return model


def _hf_bert(device):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96,
                                  max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg).to(device)
    model.set_attn_implementation("eager")
    return model


def _ids(device, b=3, n=19):
    return torch.randint(1, 97, (b, n), generator=torch.Generator().manual_seed(2)).to(device)


def _next_tokens(ids):
    """Our GPT's targets for Hugging Face's labels=ids: the next token, -1 (ignored) at the end."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)


@pytest.mark.parametrize("from_state_dict", [False, True])
def test_gpt_from_hf_matches_hf(from_state_dict, device):
    hf = _hf_gpt2(device)
    if from_state_dict:
        ours = GPT.from_hf(hf.state_dict(), GPTConfig(vocab_size=97, block_size=40, n_layer=2,
                                                      n_head=4, n_embd=48))
    else:
        ours = GPT.from_hf(hf)
    ours = ours.to(device)
    ids = _ids(device)
    with fastattn.record_backends() as ran:
        logits, loss = ours(ids, targets=_next_tokens(ids))
        loss.backward()
    assert {op for op, _ in ran} >= {"embedding_fwd", "norm_fwd", "attention_fwd",
                                     "attention_bwd", "norm_bwd", "embedding_bwd"}
    out = hf(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(logits, out.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss, atol=2e-6, rtol=1e-5)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        ref = hf_grads[name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            ref = ref.t()  # HF's Conv1D stores (in, out), nn.Linear (out, in)
        torch.testing.assert_close(p.grad, ref, atol=2e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_bert_from_hf_matches_hf_on_a_padded_batch(device):
    hf = _hf_bert(device).eval()
    ours = BertModel.from_hf(hf).to(device).eval()
    ids = _ids(device)
    mask = (torch.arange(19)[None, :] < torch.tensor([19, 7, 1])[:, None]).long().to(device)
    hidden, pooled = ours(ids, attention_mask=mask)
    out = hf(ids, attention_mask=mask)
    torch.testing.assert_close(hidden * mask[..., None], out.last_hidden_state * mask[..., None],
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pooled, out.pooler_output, atol=2e-5, rtol=1e-4)


def test_bert_from_state_dict_needs_config():
    with pytest.raises(ValueError, match="config is required"):
        BertModel.from_hf({})
    cfg = BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=40)
    hf_state = {f"bert.{k}": v for k, v in BertModel(cfg).state_dict().items()}
    assert set(BertModel.from_hf(hf_state, cfg).state_dict()) == {
        k.removeprefix("bert.") for k in hf_state}


def test_tiny_gpt_trains_like_torch_step_for_step(device):
    """Same initialisation, same batches, AdamW: the loss curves of our GPT (fastattn kernels) and
    Hugging Face's GPT-2 (torch eager ops) agree at every step within 1e-4 (relative), and the
    loss goes down."""
    hf = _hf_gpt2(device)
    ours = GPT.from_hf(copy.deepcopy(hf)).to(device)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(20):
        ids = torch.randint(1, 97, (2, 16), generator=g).to(device) % 13  # a learnable stream
        step = []
        for model, opt in ((ours, opt_ours), (hf, opt_hf)):
            opt.zero_grad()
            loss = (model(ids, targets=_next_tokens(ids))[1] if model is ours
                    else model(ids, labels=ids).loss)
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    for i, (a, b) in enumerate(losses):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {i}: fastattn {a:.6f} vs torch {b:.6f}"
    assert losses[-1][0] < 0.7 * losses[0][0]
