"""torch.compile over blocks built on fastattn ops: one graph (fullgraph=True), the eager results
forward and backward, and no recompilation per sequence length with dynamic=True."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.models import BertConfig, BertLayer, GPTBlock, GPTConfig


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
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            with fastattn.record_backends() as ran:
                got = _grads(compiled, inputs, dout)
        assert ("attention_fwd", fastattn.backend(device)) in ran
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
