"""The padded, masked per-client losses equal the methods' losses on the real rows alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flora_lightning.federation.batched_loss import (
    masked_contrastive,
    masked_cross_entropy,
    pad_rows,
    union_labels,
)

# The same log-sum-exps over the same values plus exact zeros (exp of the fill): rounding only,
# a few ulps of logits up to the scale 100.
TOL = 4 * torch.finfo(torch.float32).eps * 100


def test_masked_contrastive_is_clip_loss_on_the_real_rows():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    logits = 100 * img @ txt.T
    target = torch.arange(5)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    valid = torch.arange(9) < 5
    padded = masked_contrastive(
        pad_rows(img, 9) + 3.0 * ~valid[:, None], pad_rows(txt, 9), valid, torch.tensor(100.0)
    )
    assert abs(float(padded) - float(expected)) <= TOL
    # unmasked, the padded rows would join every softmax: a different loss
    everything = masked_contrastive(pad_rows(img, 9), pad_rows(txt, 9), valid | True,
                                    torch.tensor(100.0))  # fmt: skip
    assert abs(float(everything) - float(expected)) > 0.1


def test_masked_contrastive_gradient_is_finite_on_padding():
    img = torch.zeros(4, 3, requires_grad=True)
    masked_contrastive(img, torch.ones(4, 3), torch.tensor([True, False, False, False]),
                       torch.tensor(100.0)).backward()  # fmt: skip
    assert torch.isfinite(img.grad).all()


def test_masked_cross_entropy_is_the_mean_over_real_rows():
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    valid = torch.tensor([True, True, False, True, False, True])
    expected = F.cross_entropy(logits[valid], labels[valid])
    assert abs(float(masked_cross_entropy(logits, labels, valid)) - float(expected)) <= TOL


def test_union_labels_index_back_to_each_batch():
    union, inverse = union_labels([torch.tensor([3, 1, 3]), torch.tensor([7, 1])])
    assert union.tolist() == [1, 3, 7]
    assert [union[i].tolist() for i in inverse] == [[3, 1, 3], [7, 1]]


def test_masked_contrastive_with_a_client_dim_is_each_clients_loss():
    """[K, B, D] in, K losses out: client k's is its unbatched loss (the batched fit calls it
    so for FLoRA, without vmap)."""
    torch.manual_seed(2)
    img = F.normalize(torch.randn(3, 6, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 6, 4), dim=-1)
    valid = torch.arange(6)[None, :] < torch.tensor([6, 4, 1])[:, None]
    scale = torch.tensor(100.0)
    losses = masked_contrastive(img, txt, valid, scale)
    assert losses.shape == (3,)
    for k in range(3):
        alone = masked_contrastive(img[k], txt[k], valid[k], scale)
        assert abs(float(losses[k]) - float(alone)) <= TOL
