"""Run a shard map pass that inverts every image (under `accelerate launch`, any number of processes).

accelerate launch ... tests/scripts/map_pass_invert.py SRC DST
"""

import sys
from pathlib import Path

from uedist.dist import make_accelerator, setup_logging
from uedist.engine.map_pass import run_map_pass


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    acc = make_accelerator()
    setup_logging()
    run_map_pass(
        src,
        dst,
        lambda x, y, keys: 255 - x,
        accelerator=acc,
        stage="test:invert",
        config={"op": "invert"},
        batch_size=16,
        num_workers=1,
        progress=False,
    )


if __name__ == "__main__":
    main()
