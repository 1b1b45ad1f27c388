"""launch/dvae.py with every inference batch slowed down (training untouched), so a test can SIGKILL the job
reliably in the middle of a shard map pass. Usage: python tests/scripts/dvae_slow_pass.py <launch/dvae.py args>"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import torch  # noqa: E402

from uedist.models.dvae import DVAE  # noqa: E402

_forward = DVAE.forward


def _slow_forward(self, *args, **kwargs):
    if not self.training and not torch.is_grad_enabled():  # an inference pass
        time.sleep(0.2)
    return _forward(self, *args, **kwargs)


DVAE.forward = _slow_forward

if __name__ == "__main__":
    from dvae import main  # launch/dvae.py

    sys.exit(main(sys.argv[1:]))
