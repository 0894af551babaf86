"""The suite's own PostgreSQL does not outlive the suite: a pytest killed outright (SIGKILL, a CI timeout)
leaves no cluster running and no directory under /tmp."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from service.embedded import EmbeddedPostgres
from tests.support import alive, postmaster_pid, wait_until, watchdogs

ROOT = Path(__file__).resolve().parents[2]
# A process that starts a cluster as the `cluster` fixture does, says where, and waits to be killed.
OWNER = """
import time
from tests.conftest import start_test_cluster
pg, info = start_test_cluster()
print(info.data_dir, flush=True)
time.sleep(300)
"""


def test_a_killed_suite_leaves_no_cluster_running_and_no_directory_behind() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")} | {"PYTHONPATH": str(ROOT)}
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    data_dir, postmaster = None, None
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline().strip()
        assert line, "the cluster did not start"
        data_dir = Path(line)
        postmaster = postmaster_pid(EmbeddedPostgres(data_dir).pgdata)

        owner.send_signal(signal.SIGKILL)
        owner.wait()

        assert wait_until(lambda: not alive(postmaster), 30), "the suite's PostgreSQL outlived the suite"
        assert wait_until(lambda: not data_dir.exists(), 10)
        assert wait_until(lambda: not watchdogs(data_dir), 10)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        # Whatever a failure left: the server first, then its directory.
        if data_dir is not None and data_dir.exists():
            EmbeddedPostgres(data_dir).stop()
            shutil.rmtree(data_dir, ignore_errors=True)
