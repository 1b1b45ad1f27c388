"""Build shard sets from a source dataset (same as ``uedist shards build``).

python launch/build_shards.py --config configs/shards/cifar10.yaml cifar.root=/data/cifar-10-batches-py
"""

import sys

from uedist.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
