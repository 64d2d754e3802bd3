"""LoRA versus full fine-tuning of the same model, measured in one run on this machine; and the
same figures computed on the meta device for the Sana-600M and 1.6B configs.

Measured (the default config's transformer, 32 px pixel space, batch 16, MiniLM-wide captions;
each mode in its own subprocess so peak RSS is its own): step time (forward, backward, AdamW,
EMA; median of the timed steps), trainable parameters, checkpoint size (model + EMA +
optimizer files as ``TrainState`` writes them: a LoRA run saves the adapter only), optimizer-state
bytes (AdamW moments after a step), peak RSS (``ru_maxrss``).

Computed (meta device, nothing allocated): ``configs/sana_600m_512.yaml`` and
``sana_1600m_1024.yaml`` (DC-AE f32c32: 32 latent channels; Gemma-2-2b: 2304-wide captions) at
LoRA rank 16 and 32 on the default targets, versus full fine-tuning: trainable parameters,
AdamW state bytes (8 per trained parameter), checkpoint bytes (fp32 model or adapter + EMA +
AdamW), and the weight-side training memory (fp32 weights, grads, AdamW, EMA; a LoRA base only
its fp32 weights).

    python benchmarks/lora_bench.py [--steps 12] [--rank 4]

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sanakit.config import LoraConfig, load_config
from sanakit.models.lora import adapter_state, add_lora, lora_parameter_count
from sanakit.models.transformer import build_transformer
from sanakit.train.components import build_optimizer
from sanakit.train.state import EMA

ROOT = Path(__file__).resolve().parent.parent
BIG = {"sana_600m_512": 2304, "sana_1600m_1024": 2304}  # config -> caption width (Gemma-2-2b)


def measure(mode: str, steps: int, rank: int, batch: int) -> dict:
    """One mode (``full`` or ``lora``) of the default model, in this process."""
    cfg = load_config(None, [f"--lora.rank={rank if mode == 'lora' else 0}", "--load_from=x"])
    torch.manual_seed(0)
    model = build_transformer(cfg, 3, 384, 1)
    if mode == "lora":
        add_lora(model, cfg.lora)
    optimizer = build_optimizer(cfg, model)
    ema = EMA(model, 0.99)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x, text = torch.randn(batch, 3, 32, 32), torch.randn(batch, 16, 384)
    t, target = torch.full((batch,), 500.0), torch.randn(batch, 3, 32, 32)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, text, t).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(trainable)
        if i >= 2:
            times.append(time.perf_counter() - start)
    state = adapter_state(model) if mode == "lora" else model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:  # the three files TrainState writes
        save_file({k: v.contiguous() for k, v in state.items()}, f"{tmp}/model.safetensors")
        save_file(
            {k: v.contiguous() for k, v in ema.state_dict().items()}, f"{tmp}/ema.safetensors"
        )
        torch.save(optimizer.state_dict(), f"{tmp}/optimizer.pt")
        ckpt = sum(p.stat().st_size for p in Path(tmp).iterdir())
    opt_bytes = sum(
        v.numel() * v.element_size()
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if torch.is_tensor(v)
    )
    return {
        "step_s": statistics.median(times),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": ckpt,
        "optimizer_bytes": opt_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def computed(name: str, caption: int, rank: int) -> dict:
    """Figures for a released config on the meta device (counts, no allocation)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [])
    with torch.device("meta"):
        model = build_transformer(cfg, 32, caption, 32)
    total = sum(p.numel() for p in model.parameters())
    adapter = lora_parameter_count(model, LoraConfig(rank=rank))
    with torch.device("meta"):
        add_lora(model, LoraConfig(rank=rank))  # peft agrees with the count
    assert adapter == sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "full": {"trainable": total, "optimizer_bytes": 8 * total,
                 "checkpoint_bytes": 16 * total, "train_weight_bytes": 20 * total},
        "lora": {"trainable": adapter, "optimizer_bytes": 8 * adapter,
                 "checkpoint_bytes": 16 * adapter,
                 "train_weight_bytes": 4 * total + 20 * adapter},
    }  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.steps, a.rank, a.batch)))
        return
    measured = {}
    for mode in ("full", "lora"):
        args = [sys.argv[0], f"--child={mode}", f"--steps={a.steps}", f"--rank={a.rank}",
                f"--batch={a.batch}"]  # fmt: skip
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
        measured[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    full, lora = measured["full"], measured["lora"]
    ratios = {k: lora[k] / full[k] for k in full if k != "total"}
    print(f"default model ({full['total'] / 1e6:.2f}M params), LoRA rank {a.rank}, batch {a.batch}")
    print(f"{'':>18} {'full':>12} {'lora':>12} {'lora/full':>10}")
    for key in ratios:
        print(f"{key:>18} {full[key]:>12.4g} {lora[key]:>12.4g} {ratios[key]:>10.3f}")
    released = {}
    for name, caption in BIG.items():
        for rank in (16, 32):
            r = released[f"{name}_r{rank}"] = computed(name, caption, rank)
            lo, fu = r["lora"], r["full"]
            share = 100 * lo["trainable"] / r["total"]
            print(
                f"{name} rank {rank}: {r['total'] / 1e6:.0f}M params; trainable "
                f"{lo['trainable'] / 1e6:.2f}M ({share:.2f}%); AdamW "
                f"{gib(lo['optimizer_bytes'])} vs {gib(fu['optimizer_bytes'])}; checkpoint "
                f"{gib(lo['checkpoint_bytes'])} vs {gib(fu['checkpoint_bytes'])}; weight-side "
                f"memory {gib(lo['train_weight_bytes'])} vs {gib(fu['train_weight_bytes'])}"
            )
    print(json.dumps({"measured": measured, "ratios": ratios, "rank": a.rank,
                      "released": released}))  # fmt: skip


if __name__ == "__main__":
    main()
