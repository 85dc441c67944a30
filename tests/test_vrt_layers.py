"""VRTPrototypes, VRTEmbedding and VRTHead on a batch of 3 samples with different grids."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trp.vrt import ImageBinding, VRTContext, VRTEmbedding, VRTHead, VRTPrototypes

V, D = 50, 8


@pytest.fixture
def setup():
    torch.manual_seed(0)
    binding = ImageBinding.from_grids([[2, 3], [2, 2], [1, 3], [3, 2]], [1, 2, 1], vrt_base=V)
    protos = torch.randn(binding.total_patches, D, dtype=torch.float64)
    return binding, protos


def test_prototypes_start_at_zero_and_train():
    layer = VRTPrototypes(dim=D, rank=4)
    feats = torch.randn(7, D)
    out = layer(feats)
    assert out.shape == (7, D)
    assert torch.equal(out, torch.zeros_like(out))
    (layer(feats) * torch.randn(7, D)).sum().backward()
    assert layer.norm.weight.grad.abs().sum() > 0
    assert layer.down.weight.shape == (4, D)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(7, D + 1))


def test_prototypes_without_zero_init_start_at_the_normalised_features():
    torch.manual_seed(0)
    layer = VRTPrototypes(dim=D, rank=4, zero_init=False)
    feats = torch.randn(7, D)
    normed = torch.nn.functional.layer_norm(feats, (D,), eps=1e-6)
    out = layer(feats)
    torch.testing.assert_close(out, normed + layer.up(layer.down(normed)))
    (out * torch.randn(7, D)).sum().backward()
    assert layer.down.weight.grad.abs().sum() > 0  # the low-rank path trains from step one


def test_embedding_text_and_vrt(setup):
    binding, protos = setup
    table = nn.Embedding(V, D).double()
    emb = VRTEmbedding(text_embedding=table)
    ids = torch.tensor([[3, V + 5, 7], [V + 6, 1, V + 0], [V + 5, V + 2, 0]])
    out = emb(ids, prototypes=protos, binding=binding)
    assert out.shape == (3, 3, D)
    torch.testing.assert_close(out[0, 0], table.weight[3])
    torch.testing.assert_close(out[0, 1], protos[5])  # sample 0, patch 5
    torch.testing.assert_close(out[1, 0], protos[6 + 6])  # sample 1, 2nd image, patch (0, 2)
    torch.testing.assert_close(out[1, 2], protos[6])
    torch.testing.assert_close(out[2, 0], protos[13 + 5])
    # the VRT's image's prototype is its own image's patch
    image, _, row, col = binding.patch_of(1, 6)
    assert (image, row, col) == (2, 0, 2)


def test_embedding_beams_and_errors(setup):
    binding, protos = setup
    emb = VRTEmbedding(text_embedding=nn.Embedding(V, D).double())
    ids = torch.tensor([[V + 6]] * 6)  # 2 beams per sample; only sample 1 owns patch 6
    with pytest.raises(ValueError, match="not a patch of sample 0"):
        emb(ids, prototypes=protos, binding=binding)
    ok = emb(torch.tensor([[V + 1]] * 6), prototypes=protos, binding=binding)
    torch.testing.assert_close(ok[2, 0], protos[7])
    with pytest.raises(ValueError, match="no binding"):
        emb(torch.tensor([[V]]))
    with pytest.raises(TypeError):
        emb(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match=">= 0"):
        emb(torch.tensor([[-1]]))


def test_embedding_gradient_reaches_prototypes(setup):
    binding, protos = setup
    protos = protos.clone().requires_grad_()
    emb = VRTEmbedding(text_embedding=nn.Embedding(V, D).double())
    emb(torch.tensor([[V + 1], [V + 1], [1]]), prototypes=protos, binding=binding).sum().backward()
    assert protos.grad[1].abs().sum() > 0
    assert protos.grad[7].abs().sum() > 0
    assert protos.grad[0].abs().sum() == 0


@pytest.mark.parametrize("tied", [True, False])
def test_head_masks_other_images(setup, tied):
    binding, protos = setup
    table = nn.Embedding(V, D).double()
    head_module = table if tied else nn.Linear(D, V, bias=True).double()
    head = VRTHead(text_head=head_module)
    hidden = torch.randn(3, 4, D, dtype=torch.float64)
    logits = head(hidden, prototypes=protos, binding=binding)
    assert logits.shape == (3, 4, V + binding.max_patches)
    mask = binding.own_image_mask()
    finite = torch.isfinite(logits[..., V:])
    assert torch.equal(finite, mask[:, None, :].expand_as(finite))
    # values: own patches are h . P, text is the LM head
    for s in range(3):
        lo, hi = binding.sample_offsets[s].item(), binding.sample_offsets[s + 1].item()
        torch.testing.assert_close(logits[s, :, V : V + hi - lo], hidden[s] @ protos[lo:hi].T)
    torch.testing.assert_close(logits[..., :V], head.text_logits(hidden))
    # the PaDT layout (text ⊕ every patch of the batch): -inf exactly on other images' patches
    padt = torch.full((3, 4, V + binding.total_patches), float("-inf"), dtype=torch.float64)
    padt[..., :V] = logits[..., :V]
    for s in range(3):
        lo, hi = binding.sample_offsets[s].item(), binding.sample_offsets[s + 1].item()
        padt[s, :, V + lo : V + hi] = logits[s, :, V : V + hi - lo]
    full = hidden @ torch.cat([head_module.weight, protos]).T
    if not tied:
        full[..., :V] += head_module.bias
    own = torch.zeros(3, binding.total_patches, dtype=torch.bool)
    for s in range(3):
        own[s, binding.sample_offsets[s] : binding.sample_offsets[s + 1]] = True
    expected = full.masked_fill(
        ~torch.cat([torch.ones(3, V, dtype=torch.bool), own], 1)[:, None], float("-inf")
    )
    torch.testing.assert_close(padt, expected)


def test_head_vrt_base_below_table_and_errors(setup):
    binding, protos = setup
    table = nn.Embedding(V + 6, D).double()  # padded table: rows >= V are unused
    head = VRTHead(text_head=table, vrt_base=V)
    hidden = torch.randn(3, 1, D, dtype=torch.float64)
    assert head(hidden, prototypes=protos, binding=binding).shape[-1] == V + 7
    assert head(hidden).shape[-1] == V
    with pytest.raises(ValueError, match="shape"):
        head(hidden, prototypes=protos[:-1], binding=binding)
    with pytest.raises(ValueError, match="vrt_base"):
        VRTHead(text_head=table, vrt_base=V + 7)
    other = ImageBinding.from_grids([[2, 2]], [1], vrt_base=V + 1)
    with pytest.raises(ValueError, match="differs"):
        head(hidden[:1], prototypes=protos[:4], binding=other)


def test_head_gradient(setup):
    binding, protos = setup
    protos = protos[:, :3].clone().requires_grad_()
    head = VRTHead(text_head=nn.Linear(3, 5, bias=False).double())
    b = ImageBinding.from_grids(binding.grids[:, 1:], [1, 2, 1], vrt_base=5)
    hidden = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(h, p):
        out = head(h, prototypes=p, binding=b)
        return out.masked_fill(torch.isinf(out), 0)

    assert torch.autograd.gradcheck(f, (hidden, protos))


def test_context_rows_start_at_the_prototypes_and_learn_from_the_states():
    torch.manual_seed(0)
    layer = VRTContext(dim=D)
    protos, states = torch.randn(7, D), torch.randn(7, D)
    rows = layer(protos, states)
    assert torch.equal(rows, protos)  # zero-initialised projection
    query = torch.randn(D)
    (rows @ query).logsumexp(0).backward()
    assert layer.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(D))
    normed = torch.nn.functional.layer_norm(states, (D,), eps=1e-6)
    torch.testing.assert_close(layer(protos, states), protos + normed)
    with pytest.raises(ValueError, match="prototypes must have shape"):
        layer(torch.randn(7, D + 1), torch.randn(7, D + 1))
    with pytest.raises(ValueError, match="states must match"):
        layer(protos, torch.randn(6, D))
    with pytest.raises(ValueError, match="dim must be positive"):
        VRTContext(dim=0)


@pytest.mark.parametrize("bias", [False, True])
def test_head_decoding_writes_one_output_equal_to_the_differentiable_path(bias):
    # Without autograd VRTHead writes text and VRT logits into one buffer (no concatenation);
    # with it, it concatenates: both give the same logits, -inf on every padded patch slot.
    gen = torch.Generator().manual_seed(3)
    lm_head = nn.Linear(8, 30, bias=bias)
    head = VRTHead(text_head=lm_head, vrt_base=27)
    binding = ImageBinding.from_grids([[2, 2], [1, 3], [2, 3]], [1, 1, 1], vrt_base=27)
    hidden = torch.randn(6, 2, 8, generator=gen)
    protos = torch.randn(binding.total_patches, 8, generator=gen)
    with torch.no_grad():
        fast = head(hidden, prototypes=protos, binding=binding)
    slow = head(hidden.requires_grad_(), prototypes=protos, binding=binding)
    assert slow.requires_grad and not fast.requires_grad
    assert fast.shape == (6, 2, 27 + 6) and fast.is_contiguous()
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)
    counts = binding.patches_per_sample.tolist()
    for s, count in enumerate(counts):
        rows = fast[2 * s : 2 * s + 2]
        assert torch.isneginf(rows[..., 27 + count :]).all()
        assert torch.isfinite(rows[..., : 27 + count]).all()
