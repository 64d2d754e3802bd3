"""Flow-matching maths, caption dropout, and the resumable sampler."""

from __future__ import annotations

import torch

from sanakit.data.sampler import ResumableSampler
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


def test_sampler_covers_each_sample_once_per_epoch_across_ranks():
    n, bs, world = 103, 4, 3
    seen = []
    for rank in range(world):
        s = ResumableSampler(n, bs, seed=5, rank=rank, world_size=world)
        for batch in s.batches():
            seen.extend(batch)
    assert len(seen) == len(set(seen))
    assert n - len(seen) == ResumableSampler(n, bs, 5, 0, world).dropped_per_epoch
    assert n - len(seen) < world  # only a remainder smaller than the world size is dropped


def test_sampler_resumes_exactly_mid_epoch_and_differs_between_epochs():
    full = ResumableSampler(50, 4, seed=1)
    order = list(full.batches())
    resumed = ResumableSampler(50, 4, seed=1)
    for _ in range(5):
        resumed.advance()
    state = resumed.state_dict()
    again = ResumableSampler(50, 4, seed=1)
    again.load_state_dict(state)
    assert list(again.batches()) == order[5:]
    again.start_next_epoch()
    assert list(again.batches()) != order


def test_sampler_position_reshards_when_world_size_changes():
    one = ResumableSampler(64, 8, seed=2, rank=0, world_size=1)
    one.advance()
    one.advance()
    rest = [i for b in one.batches() for i in b]
    two = [ResumableSampler(64, 4, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(one.state_dict())
    merged = sorted(i for s in two for b in s.batches() for i in b)
    assert merged == sorted(rest)


def test_grouped_batches_never_mix_groups_and_resume_exactly():
    groups = ["wide" if i % 3 == 0 else "tall" for i in range(70)]
    seen = []
    for rank in range(2):
        s = ResumableSampler(70, 4, seed=3, rank=rank, world_size=2, groups=groups)
        for batch in s.batches():
            assert len({groups[i] for i in batch}) == 1
            seen.extend(batch)
    assert len(seen) == len(set(seen)) >= 70 - 2 * 2  # at most one short chunk per group dropped
    full = ResumableSampler(70, 4, seed=3, groups=groups)
    order = list(full.global_batches())
    assert {len({groups[i] for i in b}) for b in order} == {1}
    resumed = ResumableSampler(70, 4, seed=3, groups=groups)
    resumed.load_state_dict({**full.state_dict(), "batches_done": 4})
    assert list(resumed.global_batches()) == order[4:]
