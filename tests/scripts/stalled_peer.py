"""Two ranks; rank 1 stops itself (SIGSTOP, as a job frozen by a debugger or the OOM-swapping kernel would) and rank
0 waits in a barrier: with the collective timeout set it must exit with code 2 naming its rank and the collective,
not wait for ever. Usage: accelerate launch tests/scripts/stalled_peer.py [seconds rank 1 stays stopped]."""

import os
import signal
import subprocess
import sys

from uedist.app.jobs import guarded
from uedist.dist import get_logger, make_accelerator, setup_logging


def main() -> int:
    stop_s = float(sys.argv[1]) if len(sys.argv) > 1 else 40.0
    setup_logging()
    acc = make_accelerator()
    acc.wait_for_everyone()  # both ranks are up
    if acc.process_index == 1:
        # a watchdog resumes and ends this rank after stop_s, so a failing test leaves no frozen process behind
        cmd = f"sleep {stop_s}; kill -CONT {os.getpid()}; kill -KILL {os.getpid()}"
        quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.Popen(["sh", "-c", cmd], start_new_session=True, **quiet)  # not holding the output pipes
        os.kill(os.getpid(), signal.SIGSTOP)
        return 0
    return guarded(acc.wait_for_everyone, get_logger("uedist.stalled_peer")) or 0


if __name__ == "__main__":
    sys.exit(main())
