"""The embedded PostgreSQL's watchdog: `python -m service.embedded_watch DATA_DIR OWNER_PID [--discard]`.

Started by `EmbeddedPostgres.watch` with its stdin a pipe that only the owner holds open. A byte on it
means the owner stopped the server itself: nothing to do. End-of-file means the owner ended without doing
so, however it ended (SIGKILL, the OOM killer): the watchdog waits for the commands that joined the server,
then takes the data directory's lock, so that no command starts on it or joins it meanwhile, stops the
server if one still runs, with `--discard` deletes the data directory (a throwaway cluster), and says so in
one line. If a `serve` holds the directory by then, it reused the server: the watchdog leaves it be. It
holds no credentials: stopping a server needs none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from service.embedded import (
    EmbeddedError,
    EmbeddedPostgres,
    watchdog_data_dir,
    without_joined_users,
)


def _say(line: str) -> None:
    """One line on stderr, the owner's: it may be gone (a closed terminal, a pipe nobody reads)."""
    with contextlib.suppress(OSError):
        print(f"bedside: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.embedded_watch")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "owner", type=int, help="the owner's pid: for the message, and to tell its lock from a newer serve's"
    )
    parser.add_argument("--discard", action="store_true", help="delete the data directory after stopping")
    args = parser.parse_args(argv)

    if os.read(sys.stdin.fileno(), 1):
        return 0  # the owner stopped the server itself
    data_dir: Path = args.data_dir
    if not data_dir.is_dir():
        return 0  # deleted already: nothing runs on it
    pg = EmbeddedPostgres(data_dir)
    # First the commands that joined the server: they hold no directory lock, and a fast stop would abort
    # their transactions. The directory is not held meanwhile, so a `serve` restarted after the kill is
    # not held off by them: it reuses the server and watches it itself, and then this watchdog has nothing
    # left to do. Otherwise the directory is taken (once the command holding it, if any, has ended) and
    # the server is stopped only if nobody stopped it meanwhile.
    try:
        with without_joined_users(data_dir), watchdog_data_dir(data_dir, args.owner) as held:
            if not held:
                return 0  # a `serve` holds the directory, and the server is its own now
            stopped = pg.stop()
            if args.discard:
                shutil.rmtree(pg.pgdata.parent, ignore_errors=True)
                shutil.rmtree(pg.root, ignore_errors=True)
    except EmbeddedError as exc:
        _say(f"the process (pid {args.owner}) that ran the embedded PostgreSQL in {pg.pgdata} has ended; {exc}")
        return 1
    if stopped:
        _say(f"stopped the embedded PostgreSQL in {pg.pgdata}: the process that ran it (pid {args.owner}) has ended")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
