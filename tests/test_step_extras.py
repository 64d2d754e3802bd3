"""What a training step does beyond forward/backward: clipping, the optimizer call and the EMA,
each taken by the shortest path that gives the same numbers as the general one."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from sanakit.config import load_config
from sanakit.models.transformer import build_transformer
from sanakit.train import parallel
from sanakit.train.components import build_optimizer
from sanakit.train.state import EMA


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer(load_config(None, []), 3, 384, 1)


def backward(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 16, 384, generator=g)
    out = model(x, text, torch.full((4,), 500.0)).sample
    (out.square().mean() * 1e3).backward()  # large gradients: the clip must act


def test_clip_over_the_listed_parameters_equals_accelerates_clip():
    accelerator = Accelerator(cpu=True)
    ours = tiny_model()
    ours.patch_embed.requires_grad_(False)  # frozen parameters: no gradient to count
    theirs = copy.deepcopy(ours)
    backward(ours), backward(theirs)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    norm = parallel.clip_grad_norm(accelerator, ours, 1.0, trainable)
    expected = accelerator.clip_grad_norm_(theirs.parameters(), 1.0)
    assert norm > 1.0  # clipped, not a no-op
    assert torch.equal(norm, expected)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)


def test_the_torch_optimizer_is_stepped_unless_loss_scaling_needs_the_wrapper():
    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    optimizer = accelerator.prepare(build_optimizer(load_config(None, []), model))
    assert isinstance(optimizer, AcceleratedOptimizer)
    plain = parallel.stepping_optimizer(accelerator, optimizer)
    assert plain is optimizer.optimizer and isinstance(plain, torch.optim.AdamW)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # fp16 loss scaling: accelerate's step
    try:
        assert parallel.stepping_optimizer(accelerator, optimizer) is optimizer
    finally:
        accelerator.scaler = None
    bare = build_optimizer(load_config(None, []), model)  # FSDP: never wrapped
    assert parallel.stepping_optimizer(accelerator, bare) is bare


def test_ema_lerps_from_fp32_parameters_directly_and_from_fp32_copies_otherwise():
    for dtype, plain in ((torch.float32, True), (torch.bfloat16, False)):
        model = tiny_model().to(dtype)
        model.proj_out.requires_grad_(False)  # not trained: not averaged
        ema = EMA(model, 0.9)
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = [s.clone() for s in ema.shadow]
        with torch.no_grad():
            for p in trainable:
                p.add_(1.0)
        ema.update(trainable)
        assert ema._plain is plain
        assert len(ema.shadow) == len(trainable) < len(list(model.parameters()))
        for s, old, p in zip(ema.shadow, before, trainable, strict=True):
            assert s.dtype == torch.float32
            assert torch.equal(s, torch.lerp(old, p.float(), 0.1))
