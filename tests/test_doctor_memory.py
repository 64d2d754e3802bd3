"""doctor's memory estimate counts the optimizer state a real optimizer allocates."""

from __future__ import annotations

import pytest
import torch

from sanakit.doctor.models import optimizer_state_bytes


@pytest.mark.parametrize("name", ["adamw", "came"])
def test_optimizer_state_bytes_equal_what_the_optimizer_allocates(name: str) -> None:
    from came_pytorch import CAME

    # a 1x1 conv (as in Sana's Mix-FFN), a depthwise 3x3 conv, a linear layer and biases
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 24, 1),
        torch.nn.Conv2d(24, 24, 3, padding=1, groups=24),
        torch.nn.Flatten(),
        torch.nn.Linear(24 * 4 * 4, 5),
    )
    params = list(model.parameters())
    if name == "adamw":
        opt = torch.optim.AdamW(params)
    else:
        opt = CAME(params, lr=1e-4, betas=(0.9, 0.999, 0.9999))
    model(torch.randn(2, 8, 4, 4)).square().mean().backward()
    opt.step()
    allocated = sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0  # not the scalar step counters
    )
    assert optimizer_state_bytes(name, params) == allocated
