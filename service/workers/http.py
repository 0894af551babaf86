"""Outbound HTTP for webhooks: connect only to the address the SSRF guard checked, never follow a
redirect, give up after the timeout, and keep nothing of the response but its status code (and a
`Retry-After`). Also the system DNS resolver the guard uses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping, Sequence

import aiohttp
from yarl import URL

from service.domain.ssrf import IPAddress, ResolvedTarget
from service.domain.webhooks import TransportResult

_DEFAULT_PORTS = {"https": 443, "http": 80}
_DRAIN_LIMIT = 64 * 1024  # read (and discard) this much of a response so the connection can be reused


async def system_resolver(host: str, port: int) -> Sequence[IPAddress]:
    """Every address `host` resolves to (the guard refuses if any one is unsafe)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]  # an IPv6 zone id is not part of the address
        address = ipaddress.ip_address(text)
        if address not in addresses:
            addresses.append(address)
    return addresses


class HttpTransport:
    """One client session for every delivery. `trust_env=False`: no proxy from the environment could
    carry a delivery somewhere the guard did not check."""

    def __init__(self, *, timeout_seconds: float = 15.0, max_connections: int = 64) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl.create_default_context()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl),
                timeout=self._timeout,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, target: ResolvedTarget, headers: Mapping[str, str], body: bytes) -> TransportResult:
        host = f"[{target.address}]" if target.address.version == 6 else str(target.address)
        url = URL(f"{target.scheme}://{host}:{target.port}{target.path}", encoded=True)
        name = target.host if target.port == _DEFAULT_PORTS[target.scheme] else f"{target.host}:{target.port}"
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        retry_after: str | None = None
        try:
            async with self._client().post(
                url,
                data=body,
                headers={**headers, "Host": name},
                allow_redirects=False,
                server_hostname=target.host if target.scheme == "https" else None,
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                await response.content.read(_DRAIN_LIMIT)
                if not response.content.at_eof():
                    response.close()  # too much to drain: drop the connection instead
            if not 100 <= status <= 599:
                status, error = None, "bad-response"  # not an HTTP status (aiohttp passes 600-999 through)
            elif 300 <= status < 400:
                error = "redirect"  # never followed: a redirect could point anywhere
            elif not 200 <= status < 300:
                error = "http-status"
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientConnectorCertificateError:
            error = "tls-certificate"
        except aiohttp.ClientSSLError:
            error = "tls"
        except aiohttp.ClientConnectorError:
            error = "connect"
        except aiohttp.ServerDisconnectedError:
            error = "disconnected"
        except aiohttp.ClientResponseError:
            error = "bad-response"
        except (aiohttp.ClientError, OSError):
            error = "network"
        duration = int((time.monotonic() - started) * 1000)
        return TransportResult(status, error, retry_after, duration)
