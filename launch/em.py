"""Generate EM noise and write the poisoned shard set (launch/attack.py with the method fixed to em).

accelerate launch launch/em.py --config configs/em/cifar10.yaml [key=value ...]
accelerate launch launch/em.py        # demo scale on the built-in synthetic set
"""

import sys

from uedist.app.stages import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("attack", sys.argv[1:], doc=__doc__, method="em", default_config="configs/em/demo.yaml"))
