"""torch.compile over blocks built on fastattn ops: one graph (fullgraph=True), the eager results
forward and backward, and no recompilation per sequence length with dynamic=True, with dropout too
(its seed is a device tensor drawn inside the graph); CUDA-graph capture and replay (GPU only)."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.models import BertConfig, BertLayer, BertModel, GPTBlock, GPTConfig


def _gpt_block(device):
    torch.manual_seed(0)
    return GPTBlock(GPTConfig(n_embd=32, n_head=2)).to(device)


def _grads(module, inputs, dout):
    out = module(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    params = [p for p in module.parameters()]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves + params, dout)]


def _check_compiled_matches_eager(module, make_inputs, lengths, backend, device):
    """The first length compiles; every later length must reuse that graph (a recompile raises)."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=backend)
    for i, n in enumerate(lengths):
        inputs, dout = make_inputs(n)
        torch.manual_seed(i)  # the same dropout masks (if any) in both runs
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            with fastattn.record_backends() as ran:
                got = _grads(compiled, inputs, dout)
        assert ("attention_fwd", fastattn.backend(device)) in ran
        torch.manual_seed(i)
        want = _grads(module, inputs, dout)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gpt_block_compiles_to_one_graph_for_every_length(backend, device):
    block = _gpt_block(device)

    def make_inputs(n):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, n, 32, generator=g).to(device).requires_grad_()
        r = torch.randn(2, n, 32, generator=g).to(device).requires_grad_()
        return (x, r), torch.randn(2, n, 32, generator=g).to(device)

    lengths = [7, 13] if backend == "inductor" else [7, 13, 21]
    _check_compiled_matches_eager(block, make_inputs, lengths, backend, device)


@pytest.mark.gpu
def test_cuda_graph_captures_a_training_step():
    """Forward and backward of a GPT block captured in one CUDA graph (no host sync inside any
    fastattn op) and replayed on new inputs give the eager gradients."""
    block = _gpt_block("cuda")
    x = torch.randn(2, 64, 32, device="cuda", requires_grad=True)
    r = torch.randn(2, 64, 32, device="cuda", requires_grad=True)

    def step():
        out, _ = block(x, r)
        out.square().mean().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile the kernels) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in [x, r, *block.parameters()]:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    with torch.no_grad():  # new inputs, same buffers
        x.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.grad.clone() for t in [x, r, *block.parameters()]]
    for t in [x, r, *block.parameters()]:
        t.grad = None
    step()
    for got, want in zip(replayed, [t.grad for t in [x, r, *block.parameters()]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bert_layer_with_padding_mask_compiles_to_one_graph(device):
    torch.manual_seed(0)
    layer = BertLayer(BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                 hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)).to(device)

    def make_inputs(n):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, n, 32, generator=g).to(device).requires_grad_()
        keep = (torch.arange(n)[None, :] < torch.tensor([n, n - 3])[:, None]).to(device)
        return (x, keep[:, None, None, :]), torch.randn(2, n, 32, generator=g).to(device)

    _check_compiled_matches_eager(layer, make_inputs, [9, 14], "aot_eager", device)


def _bert_with_dropout(device):
    """A one-layer BERT in training mode with dropout in every fastattn op that has it: the fused
    embeddings (dropout after their LayerNorm) and attention (on the probabilities)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3,
                        add_pooling_layer=False)
    return BertModel(config).to(device).train()


def _bert_inputs(n, device):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 50, (2, n), generator=g).to(device)
    attention_mask = (torch.arange(n)[None, :] < torch.tensor([n, n - 2])[:, None]).to(device)
    return (ids, attention_mask), torch.randn(2, n, 32, generator=g).to(device)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dropout_compiles_to_one_graph_and_draws_a_new_mask_per_call(backend, device):
    """With dropout_p > 0 the whole model is still one graph (the dropout seed is a device tensor
    drawn in the graph, never a Python int read from the host), the compiled model gives eager's
    outputs and gradients under the same torch.manual_seed, for every length without a recompile,
    and each call draws a new mask. inductor runs with fallback_random so that its random numbers
    are eager's."""
    model = _bert_with_dropout(device)
    lengths = [9, 14] if backend == "inductor" else [9, 14, 20]
    with torch._inductor.config.patch(fallback_random=True):
        _check_compiled_matches_eager(model, lambda n: _bert_inputs(n, device), lengths, backend,
                                      device)
        (ids, attention_mask), _ = _bert_inputs(lengths[-1], device)
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
        with fastattn.record_backends() as ran:
            first = compiled(ids, attention_mask)[0]
        second = compiled(ids, attention_mask)[0]
    assert ("embedding_fwd", fastattn.backend(device)) in ran
    assert ("attention_fwd", fastattn.backend(device)) in ran
    assert not torch.equal(first, second), "a new dropout mask on every call"


@pytest.mark.gpu
def test_cuda_graph_replays_draw_new_dropout_masks_with_matching_gradients():
    """Attention with dropout captured in a CUDA graph, forward and backward: each replay draws a
    new mask (the seed is drawn on the device inside the graph), and the gradients of each replay
    are those of the mask that replay realised (v = I makes the output show it)."""
    from fastattn import reference

    torch.manual_seed(0)
    B, H, L, S, p = 2, 2, 64, 64, 0.3
    q = torch.randn(B, H, L, 32, device="cuda", requires_grad=True)
    k = torch.randn(B, H, S, 32, device="cuda", requires_grad=True)
    v = torch.eye(S, device="cuda").expand(B, H, S, S).contiguous().requires_grad_()
    do = torch.randn(B, H, L, S, device="cuda")
    holder = {}

    def step():
        out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        holder["out"] = out
        out.backward(do)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), fastattn.record_backends() as ran:
        step()
    assert ran == [("attention_fwd", "triton"), ("attention_bwd", "triton")]

    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        out = holder["out"].clone()
        keep = out != 0
        masks.append(keep)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o = reference.scaled_dot_product_attention(*leaves, True, None, None, keep, p)[0]
        want = [o, *torch.autograd.grad(o, leaves, do.double())]
        for got, w in zip([out, q.grad, k.grad, v.grad], want):
            torch.testing.assert_close(got.double(), w, atol=1e-4, rtol=1e-4)
    assert not torch.equal(masks[0], masks[1]), "each replay draws a new mask"


def test_varlen_attention_with_dropout_compiles_to_one_graph(device):
    """varlen_attention under fullgraph compile (its cu_seqlens check, a host read, is skipped
    there) with dropout: eager's output and gradients under the same torch.manual_seed."""
    lens = [5, 11, 1]
    cu = torch.tensor([0, 5, 16, 17], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(sum(lens), 2, 16, generator=g).to(device) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def attend(q, k, v, cu):  # one cu_seqlens for queries and keys, as in self-attention
        return fastattn.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                         dropout_p=0.2)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, attend):
        torch.manual_seed(0)
        with fastattn.record_backends() as ran:
            out = fn(q, k, v, cu)
            results.append([out, *torch.autograd.grad(out, [q, k, v], do)])
        assert ("varlen_attention_fwd", fastattn.backend(device)) in ran
    plain = fastattn.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    assert not torch.allclose(results[0][0], plain), "dropout changed the output"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
