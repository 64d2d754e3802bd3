"""Sampling and eval through the CLI: deterministic per seed, both samplers, EMA, CFG batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAST, run_sanakit
from PIL import Image

from sanakit.sampling import sample_latents


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("sample") / "work"
    result = run_sanakit("train", f"--work_dir={work}", *FAST, "--train.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def sample(work, out, *extra):
    result = run_sanakit(
        "sample",
        f"--checkpoint={work}",
        "--prompt=a red circle",
        "--prompt=a blue square",
        "--num_images=3",
        "--steps=4",
        f"--out={out}",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return out


@pytest.mark.slow
def test_same_seed_same_png_bytes_other_seed_differs(trained, tmp_path):
    a = sample(trained, tmp_path / "a.png", "--seed=7").read_bytes()
    b = sample(trained, tmp_path / "b.png", "--seed=7").read_bytes()
    c = sample(trained, tmp_path / "c.png", "--seed=8").read_bytes()
    assert a == b and a != c
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    # 2 prompts x 3 images of 16 px with a 2 px gap
    assert grid.shape == (2 * 16 + 2, 3 * 16 + 2 * 2, 3)


@pytest.mark.slow
def test_euler_sampler_and_ema_weights_give_other_images(trained, tmp_path):
    base = sample(trained, tmp_path / "base.png").read_bytes()
    euler = sample(trained, tmp_path / "euler.png", "--sampler=flow_euler").read_bytes()
    ema = sample(trained, tmp_path / "ema.png", "--ema").read_bytes()
    assert len({base, euler, ema}) == 3


@pytest.mark.slow
def test_eval_writes_a_report(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = run_sanakit(
        "eval",
        f"--checkpoint={trained}",
        "--samples_per_prompt=1",
        "--steps=2",
        "--cfg_scales=[1.0,3.0]",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["cfg_scales"]) == {"1.0", "3.0"}
    assert report["num_prompts"] == 18
    assert "colour %" in result.stdout


class EchoModel(torch.nn.Module):
    """Velocity = mean of the context over tokens, broadcast: lets us read what CFG combined."""

    def forward(self, x, encoder_hidden_states, encoder_attention_mask, timestep, return_dict):
        self.batch_sizes.append(x.shape[0])
        v = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x)
        return (v,)


def test_cfg_runs_both_branches_in_one_batch_and_combines_them():
    model = EchoModel()
    model.batch_sizes = []
    cond = torch.full((2, 3, 4), 2.0)
    null = torch.zeros(1, 3, 4)
    mask, null_mask = torch.ones(2, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    noise = torch.zeros(2, 1, 2, 2)
    kwargs = dict(steps=1, sampler="flow_euler", flow_shift=1.0, noise=noise)
    guided = sample_latents(model, cond, mask, null, null_mask, (1, 2, 2), cfg_scale=3.0, **kwargs)
    assert model.batch_sizes == [4]  # uncond + cond together
    plain = sample_latents(model, cond, mask, null, null_mask, (1, 2, 2), cfg_scale=1.0, **kwargs)
    assert model.batch_sizes == [4, 2]  # cfg 1: the conditional branch alone
    # one Euler step from sigma 1 to 0: x = noise - v; v = uncond + 3 (cond - uncond) = 6 vs 2
    assert torch.allclose(guided, torch.full_like(guided, -6.0))
    assert torch.allclose(plain, torch.full_like(plain, -2.0))


@pytest.mark.slow
def test_batched_grid_is_one_noise_draw_in_slices(trained):
    """Up to MAX_BATCH images: exactly the single-call bytes of earlier versions. More: the same
    noise rows in consecutive slices, deterministic, equal to one big call up to rounding."""
    from sanakit.inference import load_for_inference, sample_grid
    from sanakit.sampling import to_uint8_grid

    inf = load_for_inference(trained)
    prompts, kw = (
        ["a red circle", "a blue square"],
        dict(cfg_scale=4.5, steps=3, sampler="flow_euler"),
    )
    one_call = to_uint8_grid(inf.generate([p for p in prompts for _ in range(3)], seed=5, **kw), 3)
    whole = sample_grid(inf, prompts, 3, seed=5, **kw)
    assert np.array_equal(whole, one_call.numpy())
    sliced = sample_grid(inf, prompts, 3, seed=5, batch_size=4, **kw)
    assert np.array_equal(sliced, sample_grid(inf, prompts, 3, seed=5, batch_size=4, **kw))
    assert np.abs(sliced.astype(int) - whole.astype(int)).max() <= 1


def test_absurd_requests_are_refused_before_sampling():
    from sanakit.errors import SanakitError
    from sanakit.inference import MAX_IMAGES, check_request

    check_request(2, MAX_IMAGES // 2, image_size=32)
    with pytest.raises(SanakitError, match=str(MAX_IMAGES)):
        check_request(1, MAX_IMAGES + 1)
    with pytest.raises(SanakitError, match="megapixels"):
        check_request(4, 64, image_size=1024)


@pytest.mark.slow
def test_a_request_over_several_batches_through_the_cli(trained, tmp_path):
    a = sample(trained, tmp_path / "a.png", "--num_images=20", "--seed=3").read_bytes()
    b = sample(trained, tmp_path / "b.png", "--num_images=20", "--seed=3").read_bytes()
    assert a == b
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == (2 * 16 + 2, 20 * 18 - 2, 3)
