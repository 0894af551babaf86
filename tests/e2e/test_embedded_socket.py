"""Embedded mode's Unix socket: Bedside connects through it, only the server's user can reach it, and
it still asks for the password."""

from __future__ import annotations

import stat
from pathlib import Path

import asyncpg
import pytest

from service.embedded import socket_dir_usable
from tests.conftest import Cluster


async def test_connections_go_through_a_private_socket_and_still_need_the_password(cluster: Cluster) -> None:
    socket_dir = cluster.connection.socket_dir
    assert socket_dir is not None, "the embedded cluster should listen on a Unix socket"
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    sock = socket_dir / f".s.PGSQL.{cluster.connection.port}"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700

    dsn = cluster.app_dsn("postgres")
    assert f"host={socket_dir}" in dsn
    assert "127.0.0.1" not in dsn
    conn = await asyncpg.connect(dsn)
    try:
        # No server address: the session is on a Unix socket, not loopback TCP.
        assert await conn.fetchval("SELECT inet_server_addr()") is None
    finally:
        await conn.close()

    wrong = dsn.replace(cluster.connection.app_password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


def test_a_socket_directory_the_server_cannot_take_falls_back_to_tcp_only() -> None:
    assert socket_dir_usable(Path("/tmp/bedside-test-pg-abc/socket"))
    assert not socket_dir_usable(Path("/tmp/" + "x" * 100 + "/socket"))  # past the socket path limit
    assert not socket_dir_usable(Path("/tmp/with space/socket"))  # would need quoting through pg_ctl
