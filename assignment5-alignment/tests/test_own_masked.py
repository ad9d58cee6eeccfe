import itertools

import pytest
import torch

from cs336_alignment.masked import masked_mean, masked_normalize


def _brute(tensor, mask, dim, reduce):
    """Loops over every output cell in float64, collecting the masked values by hand."""
    t, m = tensor.double(), mask.bool()
    if dim is None:
        values = [t[idx].item() for idx in itertools.product(*map(range, t.shape)) if m[idx]]
        return torch.tensor(reduce(values), dtype=torch.float64)
    dim = dim % t.dim()
    out_shape = [s for i, s in enumerate(t.shape) if i != dim]
    out = torch.empty(out_shape, dtype=torch.float64)
    for idx in itertools.product(*map(range, out_shape)):
        values = []
        for k in range(t.shape[dim]):
            full = (*idx[:dim], k, *idx[dim:])
            if m[full]:
                values.append(t[full].item())
        out[idx] = reduce(values)
    return out


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_masked_mean_and_normalize_match_brute_force(dim):
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(3, 4, 5, generator=g)
    mask = torch.rand(3, 4, 5, generator=g) > 0.4
    mask[0, 0, 0] = False
    mask[:, 0, 0] = False  # one empty slice along dim 0: its mean must be NaN, as 0/0
    mean = _brute(tensor, mask, dim, lambda v: sum(v) / len(v) if v else float("nan"))
    total = _brute(tensor, mask, dim, sum)
    torch.testing.assert_close(masked_mean(tensor, mask, dim).double(), mean, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(masked_normalize(tensor, mask, dim, 7.0).double(), total / 7.0, rtol=1e-6, atol=1e-6)


def test_masked_out_infinities_do_not_leak():
    tensor = torch.tensor([[1.0, float("-inf"), float("nan")], [2.0, 4.0, float("inf")]])
    mask = torch.tensor([[True, False, False], [True, True, False]])
    torch.testing.assert_close(masked_mean(tensor, mask, dim=-1), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(masked_normalize(tensor, mask, normalize_constant=2.0), torch.tensor(3.5))


def test_empty_slice_mean_is_nan_and_integer_masks_work():
    tensor = torch.ones(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = masked_mean(tensor, mask, dim=1)
    assert out[0] == 1 and torch.isnan(out[1])


def test_gradient_is_zero_on_masked_positions():
    tensor = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    masked_mean(tensor, mask).backward()
    torch.testing.assert_close(tensor.grad, mask.float() / 4)


def test_shape_mismatch_and_zero_constant_are_rejected():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-zero"):
        masked_normalize(torch.ones(2), torch.ones(2, dtype=torch.bool), normalize_constant=0)
