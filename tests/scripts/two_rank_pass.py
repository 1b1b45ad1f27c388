"""Run under `accelerate launch` with 2 processes: one map pass and one training stream over a shard set.

accelerate launch --config_file configs/accelerate/cpu2.yaml tests/scripts/two_rank_pass.py SHARDS OUT.json
"""

import json
import sys

import torch

from uedist.data.loaders import make_map_loader, make_train_loader
from uedist.dist import make_accelerator


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    acc = make_accelerator()
    r, w = acc.process_index, acc.num_processes
    keys = [k for b in make_map_loader(folder, batch_size=16, rank=r, world_size=w, num_workers=2) for k in b["key"]]
    steps, train_keys = 0, []
    for b in make_train_loader(folder, batch_size=8, num_steps=12, rank=r, world_size=w, num_workers=2):
        steps += 1
        train_keys.append(b["key"])
    counts = acc.gather(torch.tensor([len(keys), steps]))
    gathered = [None] * w
    torch.distributed.all_gather_object(gathered, {"rank": r, "keys": keys, "train": train_keys})
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump(
                {
                    "world": w,
                    "type": str(acc.distributed_type),
                    "backend": torch.distributed.get_backend(),
                    "counts": counts.tolist(),
                    "ranks": gathered,
                },
                f,
            )
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
