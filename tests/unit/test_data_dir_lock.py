"""The data directory's lock: one holder at a time; a watchdog stopping a server is waited for, not refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service.embedded import WATCHDOG_PURPOSE, DataDirBusyError, data_dir_holder, exclusive_data_dir


def _hold(data_dir: Path, purpose: str, seconds: float, held: threading.Event) -> threading.Thread:
    """`exclusive_data_dir` held for `purpose` in a thread (a descriptor of its own, as another process's
    would be) for `seconds` once `held` is set."""

    def run() -> None:
        with exclusive_data_dir(data_dir, purpose):
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(5)
    return thread


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    held = threading.Event()
    thread = _hold(tmp_path, "serve", 0.5, held)
    try:
        assert data_dir_holder(tmp_path) == "serve"
        with (
            pytest.raises(DataDirBusyError, match=r"in use by `bedside serve` \(pid \d+\)"),
            exclusive_data_dir(tmp_path, "tenant"),
        ):
            pass
    finally:
        thread.join()
    assert data_dir_holder(tmp_path) is None


def test_a_watchdog_stopping_a_server_is_waited_for(tmp_path: Path) -> None:
    held = threading.Event()
    thread = _hold(tmp_path, WATCHDOG_PURPOSE, 0.5, held)
    try:
        assert data_dir_holder(tmp_path) == WATCHDOG_PURPOSE
        began = time.monotonic()
        with exclusive_data_dir(tmp_path, "serve"):
            assert data_dir_holder(tmp_path) == "serve"
            assert not thread.is_alive()
        assert time.monotonic() - began >= 0.3
    finally:
        thread.join()
