"""Generate REM noise and write the poisoned shard set (launch/attack.py with the method fixed to rem).

accelerate launch launch/rem.py --config configs/rem/cifar10.yaml [key=value ...]
accelerate launch launch/rem.py        # demo scale on the built-in synthetic set
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("attack", sys.argv[1:], doc=__doc__, method="rem", default_config="configs/rem/demo.yaml"))
