"""Flow-matching maths and caption dropout (the sampler is tested in test_sampler.py)."""

from __future__ import annotations

import torch

from sanakit.flow import (
    drop_captions,
    flow_matching_loss,
    interpolate,
    loss_by_sigma_bin,
    sample_sigmas,
    shift_sigmas,
    velocity_target,
)


def test_interpolation_endpoints_and_velocity():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    mid = interpolate(x0, noise, torch.full((3,), 0.25))
    assert torch.allclose(mid, 0.75 * x0 + 0.25 * noise)
    # d x_t / d sigma is the velocity target
    eps = 1e-3
    s = torch.full((3,), 0.4)
    numeric = (interpolate(x0, noise, s + eps) - interpolate(x0, noise, s)) / eps
    assert torch.allclose(numeric, velocity_target(x0, noise), atol=1e-2)


def test_shift_pushes_sigmas_towards_noise_and_keeps_endpoints():
    s = torch.linspace(0, 1, 11)
    shifted = shift_sigmas(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > s[1:-1]).all()
    assert torch.equal(shift_sigmas(s, 1.0), s)


def test_sigma_schemes_are_seeded_and_shaped():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = sample_sigmas(4096, "logit_normal", g1)
    b = sample_sigmas(4096, "logit_normal", g2)
    assert torch.equal(a, b)
    assert ((a > 0) & (a < 1)).all()
    assert abs(float(a.mean()) - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 0.5
    assert float(((a > 0.3) & (a < 0.7)).float().mean()) > 0.5  # and concentrated mid-range
    u = sample_sigmas(4096, "uniform", torch.Generator().manual_seed(1))
    assert abs(float(((u > 0.3) & (u < 0.7)).float().mean()) - 0.4) < 0.04


def test_dropout_swaps_embeds_and_mask_together():
    """Sana #265: a dropped caption must carry the null mask, never the caption's own mask."""
    embeds = torch.randn(4, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]] * 4)
    null_embeds = torch.full((1, 6, 3), 7.0)
    null_mask = torch.tensor([[1, 1, 0, 0, 0, 0]])
    draws = torch.tensor([0.05, 0.5, 0.01, 0.9])
    out_e, out_m, dropped = drop_captions(embeds, mask, null_embeds, null_mask, 0.1, draws)
    assert dropped.tolist() == [True, False, True, False]
    for i in (0, 2):
        assert torch.equal(out_e[i], null_embeds[0])
        assert torch.equal(out_m[i], null_mask[0])
    for i in (1, 3):
        assert torch.equal(out_e[i], embeds[i])
        assert torch.equal(out_m[i], mask[i])


def test_dropout_rate_matches_probability():
    g = torch.Generator().manual_seed(0)
    draws = torch.rand(20000, generator=g)
    e, m = torch.zeros(20000, 2, 1), torch.ones(20000, 2, dtype=torch.long)
    _, _, dropped = drop_captions(e, m, torch.ones(1, 2, 1), torch.ones(1, 2).long(), 0.1, draws)
    assert abs(float(dropped.float().mean()) - 0.1) < 0.01


class Linear(torch.nn.Module):
    """A real (if trivial) velocity model: predicts noise - x0 exactly when given x0 via kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, encoder_hidden_states, encoder_attention_mask, timestep):
        self.seen_timestep = timestep
        return type("Out", (), {"sample": x * self.w})()


def test_loss_is_mse_to_velocity_and_timestep_is_sigma_times_1000():
    model = Linear()
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    sigmas = torch.tensor([0.25, 0.75])
    out = flow_matching_loss(model, x0, torch.zeros(2, 3, 4), torch.ones(2, 3), sigmas, noise)
    assert torch.allclose(model.seen_timestep, torch.tensor([250.0, 750.0]))
    expected = ((noise - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(out.per_sample, expected)
    assert torch.allclose(out.loss, expected.mean())
    bins = loss_by_sigma_bin(out.per_sample, sigmas)
    assert set(bins) == {2, 7}
