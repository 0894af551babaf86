"""The data directory's lock: one holder at a time; a watchdog stopping a server is waited for, not refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.embedded import (
    WATCHDOG_PURPOSE,
    DataDirBusyError,
    data_dir_holder,
    exclusive_data_dir,
    joined_data_dir,
    watchdog_data_dir,
    without_joined_users,
)


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


def test_a_watchdog_leaves_the_server_to_a_newer_serve_but_not_to_its_dying_owner(tmp_path: Path) -> None:
    """The kernel may close a killed `serve`'s pipe (the watchdog wakes) before its lock: the directory then
    still says `<owner pid> serve` for a moment. That is the dead owner, to be waited for, not a newer
    `serve` that reused the server (which the watchdog leaves be). Here this process plays both."""
    held = threading.Event()
    thread = _hold(tmp_path, "serve", 0.5, held)
    try:
        with watchdog_data_dir(tmp_path, owner=os.getpid() + 1) as taken:  # another serve's: leave it
            assert taken is False
        began = time.monotonic()
        with watchdog_data_dir(tmp_path, owner=os.getpid()) as taken:  # the owner's, letting go: wait
            assert taken is True
            assert data_dir_holder(tmp_path) == WATCHDOG_PURPOSE
        assert time.monotonic() - began >= 0.3
    finally:
        thread.join()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A data directory that any user may enter (tmp_path's parents are its creator's only)."""
    path = Path(tempfile.mkdtemp(prefix="bedside-lock-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _use_the_users_lock(data_dir: Path) -> list[str]:
    """Join, then wait for those who joined (without a bound and with one), as a command, a watchdog and a
    `serve` do: what happened, and what was said on stderr."""
    said = io.StringIO()
    done = []
    with contextlib.redirect_stderr(said):
        with joined_data_dir(data_dir):
            done.append("joined")
        with without_joined_users(data_dir) as alone:
            done.append(f"alone {alone}")
        with without_joined_users(data_dir, timeout=1) as alone:
            done.append(f"alone {alone}")
    return [*done, said.getvalue()]


def test_a_users_lock_that_another_user_made_is_done_without(shared_dir: Path) -> None:
    """A command run as root that joined a `serve` leaves `bedside.users.lock` root's, 0600. The service's
    own user (its watchdog, its next `serve`, its commands) cannot open it then, and goes on without it,
    saying so, rather than fail with a traceback (a watchdog would leave the server running)."""
    lock = shared_dir / "bedside.users.lock"
    lock.touch(mode=0o600)
    if os.geteuid() != 0:  # the lock is this user's, and it may not open it: as if it were another user's
        lock.chmod(0)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe, and never returns
        status = 1
        try:
            if os.geteuid() == 0:  # root opens any file: the lock is root's, the child someone else
                os.setuid(pwd.getpwnam("nobody").pw_uid)
            os.write(writing, json.dumps(_use_the_users_lock(shared_dir)).encode())
            status = 0
        except BaseException as exc:
            os.write(writing, json.dumps([repr(exc)]).encode())
        finally:
            os._exit(status)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        report = json.loads(pipe.read())
    assert os.waitpid(child, 0)[1] == 0, report
    *done, said = report
    assert done == ["joined", "alone True", "alone True"]
    assert said.count(f"bedside: warning: cannot open {lock} (Permission denied)") == 3


def test_a_joined_command_is_waited_for_no_longer_than_the_timeout(tmp_path: Path) -> None:
    held = threading.Event()
    release = threading.Event()

    def join() -> None:
        with joined_data_dir(tmp_path):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=join)
    thread.start()
    try:
        assert held.wait(5)
        began = time.monotonic()
        with without_joined_users(tmp_path, timeout=0.5) as alone:
            assert not alone
        assert time.monotonic() - began >= 0.5
    finally:
        release.set()
        thread.join()
    with without_joined_users(tmp_path, timeout=0.5) as alone:
        assert alone
