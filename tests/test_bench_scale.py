"""fedfuse bench scale: the process tree's memory is measured over every descendant, not the parent alone."""

import os
import signal
import subprocess
import sys
import time

from simulations.bench.scale import tree_rss


def test_tree_memory_counts_a_grandchild_that_holds_memory():
    # Prepare: a child that starts a grandchild holding 200 MiB (Ray's workers are the simulate process's grandchildren)
    holder = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {holder!r}])"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout.readline().strip() == "ok"
        time.sleep(0.2)
        # Execute / Assert: the child's tree holds the grandchild's 200 MiB; the child alone holds far less
        assert tree_rss(child.pid) >= 200 * 2**20
        with open(f"/proc/{child.pid}/statm") as f:
            assert int(f.read().split()[1]) * 4096 < 100 * 2**20
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child and the grandchild (their own session)
        child.wait()
