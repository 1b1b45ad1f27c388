"""cos(p̂, x − clean) of the trained D-VAE of diag.sh, per stage, over the 10,000 samples: does p̂ carry the
perturbation? (D-VAE passes now report it themselves when data.clean is given; this measures the run of diag.sh,
which was made before, from its checkpoints, with the pass's own latent rule: z = μ when sample_latent is false.)

    python docs/results/dvae_diagnosis/fit.py --run runs/dvae_lsp12 --clean shards/cifar10_jpg/train
"""

import argparse
import json
from pathlib import Path

import torch

from uedist.checkpoint import latest_checkpoint, load_state
from uedist.config import load_config
from uedist.data.loaders import make_map_loader
from uedist.data.manifest import load_manifest
from uedist.engine.purifiers.dvae import DVAEConfig, FitStats, build_dvae
from uedist.ops.images import to_unit


class _One:
    num_processes = 1


@torch.no_grad()
def fit(model, src: Path, clean: Path) -> dict:
    stats = FitStats(torch.device("cpu"))
    for b, c in zip(make_map_loader(src, batch_size=250), make_map_loader(clean, batch_size=250), strict=True):
        if not b["key"]:
            continue
        assert b["key"] == c["key"]
        x = to_unit(b["image"])
        stats.update(x, model(x, b["label"], sample=False).p.float(), to_unit(c["image"]))
    return stats.result(_One())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--clean", type=Path, required=True)
    a = ap.parse_args()
    cfg = load_config(DVAEConfig, a.run / "config.yaml")
    out = {}
    for stage, src in ((1, Path(cfg.data.src)), (2, a.run / "p1")):
        model = build_dvae(cfg, load_manifest(src))
        model.load_state_dict(load_state(latest_checkpoint(a.run / f"stage{stage}" / "checkpoints"))["model"])
        out[f"stage{stage} on {src.name if stage == 2 else 'P0'}"] = fit(model.eval(), src, a.clean)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
