"""launch/dvae.py with every inference batch slowed down (training untouched), so a test can SIGKILL the job
reliably in the middle of a shard map pass. Usage: python tests/scripts/dvae_slow_pass.py <launch/dvae.py args>"""

import sys
import time

import torch

from uedist.models.dvae import DVAE

_forward = DVAE.forward


def _slow_forward(self, *args, **kwargs):
    if not self.training and not torch.is_grad_enabled():  # an inference pass
        time.sleep(0.2)
    return _forward(self, *args, **kwargs)


DVAE.forward = _slow_forward

if __name__ == "__main__":
    from uedist.app.jobs import run_stage_main  # what launch/dvae.py runs

    sys.exit(run_stage_main("purify", sys.argv[1:], method="dvae"))
