"""Issue 36 part 1: how fast does a D-VAE stage 1 make p̂ carry the perturbation, and what changes that?

Trains stage 1 of the D-VAE (``uedist.models.dvae.DVAE`` and ``dvae_loss``, the study's model and loss: Adam, cosine
decay to 0 over the run, gradient clip 5, kld limit 1.0 at weight 0.01, the p̂ floor from a given step) on a poisoned
set held in memory, and every ``--eval-every`` steps measures on a fixed 1,000 images (z = μ, as the passes do):

- ``p_cos``: the per-image cosine between p̂ and the true perturbation (input − clean), averaged; 1 = p̂ is the
  perturbation, 0 = unrelated;
- ``p1_psnr``: PSNR of clip(x − p̂) against clean, i.e. the P¹ this model would write (the input's own is printed
  at step 0);
- ``rec``, ``rec_p``: ‖x̂ − x‖² and ‖clip(x̂ + p̂) − x‖² (per-pixel means), ``p_rms`` (/255).

It is a measuring script, not a stage: no checkpoints, no resume. One thread, the training order seeded:

    python docs/results/dvae_diagnosis/steps.py --poisoned runs/lsp_c10/poisoned --clean shards/cifar10_jpg/train \
        --width 0.5 --batch 128 --steps 940 --out docs/results/dvae_diagnosis/steps/w05_b128.csv
"""

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from uedist.data.loaders import make_map_loader
from uedist.models.dvae import DVAE, dvae_loss
from uedist.ops.images import to_unit


def load(folder: Path):
    xs, ys, keys = [], [], []
    for b in make_map_loader(folder, batch_size=500):
        if b["key"]:
            xs.append(b["image"])
            ys.append(b["label"])
            keys += list(b["key"])
    return torch.cat(xs), torch.cat(ys), keys


@torch.no_grad()
def measure(model: DVAE, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor) -> dict:
    model.eval()
    out = model(x, y, sample=False)
    model.train()
    d, p = (x - clean).flatten(1), out.p.flatten(1)
    cos = ((d * p).sum(1) / (d.norm(dim=1) * p.norm(dim=1)).clamp_min(1e-12)).mean()
    p1 = (x - out.p).clamp(0, 1)
    return {
        "p_cos": cos.item(),
        "p1_psnr": -10 * math.log10(F.mse_loss(p1, clean).item()),
        "rec": F.mse_loss(out.rec, x).item(),
        "rec_p": F.mse_loss((out.rec + out.p).clamp(0, 1), x).item(),
        "p_rms": 255 * out.p.pow(2).mean().sqrt().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--poisoned", type=Path, required=True)
    ap.add_argument("--clean", type=Path, required=True)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--steps", type=int, default=940)
    ap.add_argument("--floor-from", type=float, default=11 / 60, help="p̂ floor from this fraction of the steps")
    ap.add_argument("--kld-limit", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    x_all, y_all, keys = load(a.poisoned)
    c_all, _, ckeys = load(a.clean)
    if keys != ckeys:
        raise SystemExit("poisoned and clean sets hold different keys")
    n = x_all.shape[0]
    ev = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:1000]
    xe, ye, ce = to_unit(x_all[ev]), y_all[ev], to_unit(c_all[ev])
    model = DVAE(10, width=a.width)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    floor_step = math.ceil(a.floor_from * a.steps)
    g = torch.Generator().manual_seed(a.seed)
    perm, pos, rows, t0 = torch.randperm(n, generator=g), 0, [], time.time()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            rows.append({"step": step, "epoch": round(step * a.batch / n, 2), **measure(model, xe, ye, ce)})
            rows[-1]["sec"] = round(time.time() - t0, 1)
            print(json.dumps(rows[-1]), flush=True)
            with open(a.out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        if step == a.steps:
            break
        if pos + a.batch > n:  # drop_last, reshuffle each epoch
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + a.batch]
        pos += a.batch
        out = model(to_unit(x_all[idx]), y_all[idx])
        loss, _ = dvae_loss(
            out,
            to_unit(x_all[idx]),
            kld_limit=a.kld_limit,
            kld_weight=0.01,
            p_floor=0.002 if step + 1 > floor_step else None,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()


if __name__ == "__main__":
    main()
