"""The lab stops on SIGINT even when started with SIGINT ignored (`geomesh lab &` from a
non-interactive script), and on SIGTERM: the handlers `geomesh lab` installs, checked in a child
process that inherited SIGINT as ignored (a unit-level check; bringing a whole lab up is heavy)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

CHILD = """
import sys, time
from geomesh.lab.cli import install_signal_handlers
install_signal_handlers()
try:
    print("ready", flush=True)
    time.sleep(30)
except KeyboardInterrupt:
    print("tearing down", flush=True)
    sys.exit(0)
sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_lab_handlers_stop_on_sigint_and_sigterm_even_when_sigint_was_ignored(sig):
    def ignore_sigint() -> None:  # what a non-interactive shell does to `cmd &`
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             preexec_fn=ignore_sigint)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(sig)
        out, _ = child.communicate(timeout=10)
        assert child.returncode == 0 and "tearing down" in out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
