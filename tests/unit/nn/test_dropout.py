import pytest
import torch

from meft_fx.nn.dropout import Dropout, apply_mask, keep_mask


def test_keep_mask_keeps_one_minus_p_and_follows_the_seed():
    n, p = 1_000_000, 0.1
    torch.manual_seed(0)
    m = keep_mask((1000, 1000), p)
    assert m.dtype == torch.bool and m.shape == (1000, 1000)
    rate = m.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 1000), p), m)
    assert not torch.equal(keep_mask((1000, 1000), p), m)  # the generator advanced


def test_drawing_in_row_major_chunks_gives_the_whole_mask():
    torch.manual_seed(1)
    whole = keep_mask((4, 3, 5, 7), 0.3)
    torch.manual_seed(1)
    out = torch.empty(4, 3, 5, 7, dtype=torch.bool)
    keep_mask((1, 3, 5, 7), 0.3, out=out[:1])
    for i in range(3):
        keep_mask((5, 7), 0.3, out=out[1, i])
    keep_mask((2, 3, 5, 7), 0.3, out=out[2:])
    assert torch.equal(out, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_mask_has_the_bits_of_dropouts_noise_product(dtype):
    p = 0.1
    t = torch.randn(64, 33, dtype=dtype)
    kept = keep_mask(t.shape, p)
    noise = kept.to(dtype).div_(1 - p)  # what aten's dropout multiplies by
    assert torch.equal(apply_mask(t, kept, p), t * noise)


def test_dropout_module_train_eval_and_gradient():
    d = Dropout(0.25)
    assert isinstance(d, torch.nn.Dropout)
    x = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    d.eval()
    assert torch.equal(d(x), x)
    d.train()
    torch.manual_seed(5)
    y = d(x)
    torch.manual_seed(5)
    kept = keep_mask(x.shape, 0.25)
    assert torch.equal(y, apply_mask(x, kept, 0.25))
    assert 0.6 < kept.double().mean().item() < 0.9
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / 0.75, rtol=0, atol=0)
    # what nn.Dropout does itself: p = 0, p = 1, in place
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.count_nonzero(Dropout(1.0).train()(x)) == 0
    z = x.detach().clone()
    Dropout(0.5, inplace=True).train()(z)
    assert (z == 0).any() and (z != 0).any()
