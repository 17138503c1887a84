"""OFA's position scheme and attention pinned to hand-computed values and a naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from ofa_ufo.layers import attention
from ofa_ufo.layers.attention import OFAAttention
from ofa_ufo.layers.position import image_position_ids, image_relative_buckets, text_relative_buckets


def test_text_buckets_match_ofa_formula():
    table = text_relative_buckets(256, 1024)
    assert table.shape == (1024, 1024) and table.min() == 0 and table.max() == 510
    assert table[0, 0] == 255 and table[5, 0] == 260 and table[0, 5] == 250
    assert table[128, 0] == 255 + 128  # |r| <= 128 is exact
    expected = math.ceil(math.log(200 / 128) / math.log(1023 / 128) * 127) + 128  # log bucket for r = 200
    assert table[200, 0] == 255 + expected and table[0, 200] == 255 - expected


def test_image_buckets_match_beit_layout():
    index = image_relative_buckets(42)
    span = 83
    assert index.shape == (1765, 1765) and index.max() == span * span + 2
    assert index[1, 2] == (0 + 41) * span + (-1 + 41)  # cell (0,0) -> (0,1): dy 0, dx -1
    assert index[1 + 42, 1] == (1 + 41) * span + 41  # one row down
    assert index[0, 5] == span * span and index[5, 0] == span * span + 1 and index[0, 0] == span * span + 2
    assert image_position_ids(2, 3, 42, torch.device("cpu")).tolist() == [1, 2, 3, 43, 44, 45]


def test_attention_equals_naive_ofa_formula():
    torch.manual_seed(0)
    attn = OFAAttention(32, 4, scale_factor=2.0).eval()
    with torch.no_grad():
        attn.c_attn.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    x, bias = torch.randn(2, 5, 32), torch.randn(2, 4, 5, 5)
    q = attn.q_proj(x).view(2, 5, 4, 8).transpose(1, 2) / math.sqrt(2 * 8)
    k = attn.k_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    heads = (probs @ v) * attn.c_attn.view(1, 4, 1, 1)
    expected = attn.out_proj(heads.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x, bias), expected, atol=1e-6, rtol=1e-5)


def _graph_nodes(node, seen=None) -> set[str]:
    """Names of the autograd nodes reachable from `node`."""
    seen = set() if seen is None else seen
    if node is not None and node not in seen:
        seen.add(node)
        for child, _ in node.next_functions:
            _graph_nodes(child, seen)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("block_bytes", [None, 4 * 5 * 7 * 4, 1])
def test_training_attention_gradients_match_the_math_path(monkeypatch, block_bytes):
    """Training on CPU recomputes the probabilities in backward (`_RecomputedAttention`), all rows
    at once, one batch row at a time (block_bytes = one row's scores) or one head of one row at a
    time (block_bytes=1): outputs and the gradients of
    input, weights and each bias term (a position bias broadcast over the batch, a padding mask, a
    cross-attention bias) equal autograd through the naive formula."""
    if block_bytes is not None:
        monkeypatch.setattr(attention, "_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    attn = OFAAttention(32, 4, scale_factor=2.0).train()
    x, memory = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 7, 32)
    position = torch.randn(1, 4, 5, 5, requires_grad=True)
    padding = torch.zeros(2, 1, 1, 5).masked_fill(torch.tensor([False, False, False, True, True]), -1e9)
    cross = torch.randn(2, 4, 5, 7, requires_grad=True)

    def naive(query_states, keys_from, *biases):
        q = attn.q_proj(query_states).view(2, 5, 4, 8).transpose(1, 2) / math.sqrt(2 * 8)
        k = attn.k_proj(keys_from).view(2, -1, 4, 8).transpose(1, 2)
        v = attn.v_proj(keys_from).view(2, -1, 4, 8).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) + sum(biases), dim=-1)
        heads = (probs @ v) * attn.c_attn.view(1, 4, 1, 1)
        return attn.out_proj(heads.transpose(1, 2).reshape(2, 5, 32))

    leaves = [x, position, cross, *attn.parameters()]
    for ours, expected in [(lambda: attn(x, (position, padding)), lambda: naive(x, x, position, padding)),
                           (lambda: attn(x, cross, key_value_states=memory), lambda: naive(x, memory, cross))]:
        out = ours()
        assert "_RecomputedAttentionBackward" in _graph_nodes(out.grad_fn)
        grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
        reference = expected()
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
        wanted = torch.autograd.grad(reference.square().sum(), leaves, allow_unused=True)
        for got, want in zip(grads, wanted):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert position.shape == (1, 4, 5, 5)  # the bias was used broadcast, not expanded over the batch


def test_cached_index_tables_built_in_inference_mode_still_train():
    text_relative_buckets.cache_clear()
    image_relative_buckets.cache_clear()
    with torch.inference_mode():
        text_relative_buckets(8, 32)
        image_relative_buckets(4)
    assert not text_relative_buckets(8, 32).is_inference() and not image_relative_buckets(4).is_inference()


@pytest.mark.parametrize("length, checkpointed", [(8, False), (1200, True)])
def test_ffn_activation_recomputed_only_when_large(monkeypatch, length, checkpointed):
    """The FFN's activation + norm is recomputed in backward only for activations above 4 MiB (a Base step at
    384 px); a small one (the demo's 64 px steps) keeps it, as recomputing costs more than it saves there.
    The gradients are the same either way."""
    from ofa_ufo.layers import normformer

    calls = []
    real = normformer.checkpoint
    monkeypatch.setattr(normformer, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    torch.manual_seed(0)
    layer = normformer.EncoderLayer(32, 4, 1024)  # (1, length, 1024) fp32: 32 KiB or 4.7 MiB
    x = torch.randn(1, length, 32, requires_grad=True)
    layer(x, None).sum().backward()
    assert bool(calls) == checkpointed
    grads = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    monkeypatch.setattr(normformer, "_CHECKPOINT_BYTES", 0 if not checkpointed else 2**40)  # the other way
    layer(x, None).sum().backward()
    for before, after in zip(grads, [x.grad, *(p.grad for p in layer.parameters())]):
        assert torch.allclose(before, after, atol=1e-6)
