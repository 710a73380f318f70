"""grass::factorized_mask: hard (gather) and soft (sigmoid-weighted) masks of both factors."""
import pytest
import torch
from helpers import hard_mask_case, soft_mask_case

import grass_ops


def test_hard_mask_gathers_and_soft_mask_weights():
    x_in, g_out, in_idx, out_idx, _ = hard_mask_case()
    a, b = grass_ops.factorized_mask(x_in, g_out, in_idx, out_idx)
    torch.testing.assert_close(a, x_in[..., in_idx])
    torch.testing.assert_close(b, g_out[..., out_idx])
    x_in, g_out, s_in, s_out, tau = soft_mask_case()
    a, b = grass_ops.factorized_mask(x_in, g_out, s_in, s_out, tau)
    torch.testing.assert_close(a, x_in * torch.sigmoid(s_in / tau))
    torch.testing.assert_close(b, g_out * torch.sigmoid(s_out / tau))


def test_soft_mask_selects_nothing_at_low_temperature_for_negative_logits():
    x_in, g_out, s_in, s_out, _ = soft_mask_case()
    a, _ = grass_ops.factorized_mask(x_in, g_out, -torch.ones_like(s_in), s_out, 1e-3)
    assert float(a.abs().max()) < 1e-100


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: (a[0], a[1], a[2].float()[:6], a[3], 1.0), ValueError, "both be index masks or both logits"),
        (lambda a: (a[0], a[1], torch.tensor([0, 0]), a[3], 1.0), ValueError, "in_mask must hold distinct"),
        (lambda a: (a[0], a[1], a[2], torch.tensor([9]), 1.0), ValueError, r"out_mask values must lie in \[0, 5\)"),
        (lambda a: (a[0], a[1], a[2], a[3], 0.0), ValueError, "temperature must be > 0"),
        (lambda a: (a[0], a[1], torch.zeros(5), torch.zeros(5), 1.0), ValueError, "in_mask logits must have length 6"),
        (lambda a: (a[0].long(), a[1], a[2], a[3], 1.0), TypeError, "x_in must be float"),
    ],
)
def test_factorized_mask_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        grass_ops.factorized_mask(*mutate(hard_mask_case()))
