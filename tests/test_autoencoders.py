"""Autoencoder adapters: identity, tiny DC-AE / KL round trips, scaling, loading, errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import sanakit.models.tiny as hm
from sanakit.errors import ModelLoadError
from sanakit.models.autoencoder import (
    Autoencoder,
    DCAutoencoder,
    KLAutoencoder,
    PixelAutoencoder,
    build_autoencoder,
)


def vae_cfg(kind: str, path: object = "", scaling=None, shift=None) -> SimpleNamespace:
    return SimpleNamespace(type=kind, name_or_path=path, scaling_factor=scaling, shift_factor=shift)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vaes")
    return {k: str(hm.make_tiny_autoencoder(k, root / k)) for k in ("dc-ae", "sd-vae")}


def pixels(h: int = 16, w: int = 24) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_pixel_is_identity() -> None:
    ae = build_autoencoder(vae_cfg("pixel"), "cpu", torch.float32)
    assert isinstance(ae, PixelAutoencoder) and isinstance(ae, Autoencoder)
    assert (ae.latent_channels, ae.downsample_factor) == (3, 1)
    x = pixels()
    assert torch.equal(ae.encode(x), x)
    assert torch.equal(ae.decode(x), x)
    assert torch.equal(ae.decode(x * 3), (x * 3).clamp(-1, 1))
    assert ae.fingerprint() == build_autoencoder(vae_cfg("pixel"), "cpu", "float32").fingerprint()


@pytest.mark.parametrize(
    ("kind", "cls", "scale", "shift"),
    [
        ("dc-ae", DCAutoencoder, hm.TINY_DCAE_SCALING, 0.0),
        ("sd-vae", KLAutoencoder, hm.TINY_SDVAE_SCALING, hm.TINY_SDVAE_SHIFT),
    ],
)
def test_load_from_folder_round_trip_and_scaling(
    saved: dict[str, str], kind: str, cls: type, scale: float, shift: float
) -> None:
    ae = build_autoencoder(vae_cfg(kind, saved[kind]), "cpu", torch.float32)
    assert isinstance(ae, cls) and ae.name == kind
    assert (ae.latent_channels, ae.downsample_factor) == (4, 2)
    # None in the config means: take the factors from the model's own config.
    assert (ae.scaling_factor, ae.shift_factor) == (scale, shift)
    x = pixels()
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 12)
    assert ae.latent_size(16, 24) == (8, 12)
    assert not z.requires_grad
    assert torch.equal(ae.encode(x), z)  # deterministic: posterior mode / no sampling
    with torch.no_grad():
        raw = ae._raw_encode(x)
    torch.testing.assert_close(z, (raw - shift) * scale)
    out = ae.decode(z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    # The decoder sees the unscaled latents again.
    with torch.no_grad():
        expected = ae.module.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_explicit_factors_override_config(saved: dict[str, str]) -> None:
    ae = build_autoencoder(vae_cfg("sd-vae", saved["sd-vae"], 2.0, 0.5), "cpu", torch.float32)
    assert (ae.scaling_factor, ae.shift_factor) == (2.0, 0.5)
    x = pixels()
    with torch.no_grad():
        raw = ae._raw_encode(x)
    torch.testing.assert_close(ae.encode(x), (raw - 0.5) * 2.0)


def test_module_object_and_fingerprints(saved: dict[str, str]) -> None:
    from_obj = build_autoencoder(vae_cfg("dc-ae", hm.tiny_dcae()), "cpu", torch.float32)
    from_disk = build_autoencoder(vae_cfg("dc-ae", saved["dc-ae"]), "cpu", torch.float32)
    x = pixels()
    torch.testing.assert_close(from_obj.encode(x), from_disk.encode(x))
    fp = from_disk.fingerprint()
    assert len(fp) == 64 and fp == from_disk.fingerprint()
    again = build_autoencoder(vae_cfg("dc-ae", saved["dc-ae"]), "cpu", torch.float32)
    assert again.fingerprint() == fp
    rescaled = build_autoencoder(vae_cfg("dc-ae", saved["dc-ae"], 1.0), "cpu", torch.float32)
    assert rescaled.fingerprint() != fp
    before = from_obj.fingerprint()
    with torch.no_grad():
        next(from_obj.module.parameters()).add_(1.0)
    assert from_obj.fingerprint() != before  # in-memory weights are hashed, not cached


def test_pipeline_folder_with_vae_subfolder(tmp_path) -> None:
    hm.make_tiny_autoencoder("dc-ae", tmp_path / "pipe" / "vae")
    ae = build_autoencoder(vae_cfg("dc-ae", str(tmp_path / "pipe")), "cpu", torch.float32)
    assert ae.encode(pixels(8, 8)).shape == (2, 4, 4, 4)


# huggingface_hub warns about a deprecated argument diffusers passes on the Hub-id code path.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_load_errors(tmp_path, saved: dict[str, str]) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="nope"):
        build_autoencoder(vae_cfg("dc-ae", str(missing)), "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match="name_or_path"):
        build_autoencoder(vae_cfg("sd-vae", ""), "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match="vae.type=sd-vae"):
        build_autoencoder(vae_cfg("dc-ae", saved["sd-vae"]), "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        build_autoencoder(vae_cfg("dc-ae", "no-such-org/no-such-vae"), "cpu", torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        build_autoencoder(vae_cfg("dc-ae", str(tmp_path / "empty")), "cpu", torch.float32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderDC"}))
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="broken") as info:
        build_autoencoder(vae_cfg("dc-ae", str(broken)), "cpu", torch.float32)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="unknown vae.type"):
        build_autoencoder(vae_cfg("vq"), "cpu", torch.float32)
