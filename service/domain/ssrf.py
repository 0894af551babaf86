"""Webhook URLs that cannot reach inside: strict parsing, address classification, no DNS rebinding.

    target = check_url(url, resolve, allow_http_loopback=False, allow_networks=())
    # connect to target.address (and only to it), port target.port, with SNI and Host = target.host

A physician's webhook URL is attacker-controlled input that Bedside's own workers will call, so it must
not reach loopback, private networks, cloud metadata services or anything else not globally routable
(the Standard Webhooks specification's "Server side request forgery" section). `check_url` parses the
URL strictly, resolves the host with the injected resolver, refuses if any resolved address is not
global, and returns the one address the caller then connects to: a second resolution by the HTTP client
(DNS rebinding) never happens. Call it at registration and again before every delivery.

Pure: no sockets. Async callers resolve themselves and use `parse_url` then `check_addresses`.
`UnsafeUrlError` carries a fixed `reason` and a fixed message: never the URL, whose path or query may
carry the receiver's token.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeAlias

from service.errors import FieldProblem, InvalidRequestError

__all__ = [
    "MAX_URL_LENGTH",
    "AddressReason",
    "IPAddress",
    "IPNetwork",
    "ParsedUrl",
    "ResolvedTarget",
    "UnsafeUrlError",
    "UrlReason",
    "check_addresses",
    "check_url",
    "classify",
    "parse_url",
]

IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = IPv4Network | IPv6Network

MAX_URL_LENGTH = 2048


class AddressReason(StrEnum):
    """Why an address is not acceptable as a webhook destination (see `classify`)."""

    UNSPECIFIED = "unspecified"  # 0.0.0.0/8, ::
    LOOPBACK = "loopback"  # 127.0.0.0/8, ::1
    PRIVATE = "private"  # RFC 1918; 64:ff9b:1::/48 (local-use NAT64, RFC 8215)
    CGNAT = "cgnat"  # 100.64.0.0/10 shared address space (RFC 6598)
    LINK_LOCAL = "link-local"  # 169.254.0.0/16, fe80::/10
    METADATA = "metadata"  # cloud instance metadata services; never allow-listable
    MULTICAST = "multicast"  # 224.0.0.0/4, ff00::/8
    BROADCAST = "broadcast"  # 255.255.255.255
    DOCUMENTATION = "documentation"  # TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20
    BENCHMARK = "benchmark"  # 198.18.0.0/15, 2001:2::/48
    UNIQUE_LOCAL = "unique-local"  # fc00::/7
    SITE_LOCAL = "site-local"  # fec0::/10 (deprecated)
    DISCARD = "discard"  # 100::/64 (discard-only)
    SCOPED = "scoped"  # an IPv6 address with a zone (%eth0)
    RESERVED = "reserved"  # anything else not global unicast: 240/4, 192.0.0.0/24, outside 2000::/3...


class UrlReason(StrEnum):
    """Why a URL is refused before any address is looked at."""

    MALFORMED = "malformed"  # not an absolute URL of the accepted shape, bad characters, too long
    SCHEME = "scheme"  # not https (http only to loopback, with the development switch)
    USERINFO = "userinfo"  # user:password@ in the authority
    FRAGMENT = "fragment"  # a #fragment
    PORT = "port"  # empty, non-decimal, leading zero, or outside 1..65535
    HOST = "host"  # not a valid (IDNA) host name or IP literal
    IP_SHORTHAND = "ip-shorthand"  # a numeric host that is not a dotted quad: 2130706433, 0x7f.1, 0177.1
    UNRESOLVABLE = "unresolvable"  # the resolver found no address


_MESSAGES: dict[str, str] = {
    UrlReason.MALFORMED: "The webhook URL is not a well-formed absolute https URL",
    UrlReason.SCHEME: "The webhook URL must use https",
    UrlReason.USERINFO: "The webhook URL must not contain a user name or password",
    UrlReason.FRAGMENT: "The webhook URL must not contain a fragment",
    UrlReason.PORT: "The webhook URL has an invalid port",
    UrlReason.HOST: "The webhook URL has an invalid host name",
    UrlReason.IP_SHORTHAND: "The webhook URL's host must be a name or a dotted-quad IPv4 or an IPv6 literal",
    UrlReason.UNRESOLVABLE: "The webhook URL's host name does not resolve",
}


class UnsafeUrlError(InvalidRequestError):
    """A webhook URL Bedside will not call. `reason` is a `UrlReason` or `AddressReason`.

    A 422 on the `url` field. The message is fixed per reason and never quotes the URL, its host or an
    address.
    """

    code = "unsafe-url"
    title = "The webhook URL is not acceptable"

    def __init__(self, reason: UrlReason | AddressReason) -> None:
        if isinstance(reason, AddressReason):
            detail = f"The webhook URL resolves to an address that is not publicly routable ({reason.value})"
        else:
            detail = _MESSAGES[reason]
        super().__init__([FieldProblem(("url",), f"unsafe-url:{reason.value}", detail)], detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ParsedUrl:
    """A URL that passed `parse_url`: lower-case scheme, ASCII (A-label) host, explicit port, target.

    `host` is a lower-case DNS name, or an IP address's canonical text (no brackets). `target` is the
    path and query to request ("/" at least). `literal` is set when the host is an IP literal.
    """

    scheme: str
    host: str
    port: int
    target: str
    literal: IPAddress | None

    def __repr__(self) -> str:
        # The path and query may carry the receiver's token.
        return f"ParsedUrl(scheme={self.scheme!r}, host={self.host!r}, port={self.port}, target=<redacted>)"


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """Where to deliver: connect to `address` (never re-resolve `host`) on `port`.

    `host` (the ASCII host name, or the IP literal's text) is for SNI, certificate checks and the Host
    header; `path` is the request target, path and query ("/" at least).
    """

    scheme: str
    host: str
    port: int
    address: IPAddress
    path: str

    def __repr__(self) -> str:
        return (
            f"ResolvedTarget(scheme={self.scheme!r}, host={self.host!r}, port={self.port}, "
            f"address={str(self.address)!r}, path=<redacted>)"
        )


# --- addresses ----------------------------------------------------------------------------------------

_V4 = IPv4Network
_V6 = IPv6Network

# First match wins: the specific entries (metadata) come before the ranges that contain them.
_V4_TABLE: tuple[tuple[IPv4Network, AddressReason], ...] = (
    (_V4("169.254.169.254/32"), AddressReason.METADATA),  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    (_V4("169.254.170.2/32"), AddressReason.METADATA),  # AWS ECS task metadata and credentials
    (_V4("100.100.100.200/32"), AddressReason.METADATA),  # Alibaba Cloud
    (_V4("0.0.0.0/8"), AddressReason.UNSPECIFIED),
    (_V4("10.0.0.0/8"), AddressReason.PRIVATE),
    (_V4("100.64.0.0/10"), AddressReason.CGNAT),
    (_V4("127.0.0.0/8"), AddressReason.LOOPBACK),
    (_V4("169.254.0.0/16"), AddressReason.LINK_LOCAL),
    (_V4("172.16.0.0/12"), AddressReason.PRIVATE),
    (_V4("192.0.0.0/24"), AddressReason.RESERVED),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), AddressReason.DOCUMENTATION),
    (_V4("192.88.99.0/24"), AddressReason.RESERVED),  # former 6to4 relay anycast (RFC 7526)
    (_V4("192.168.0.0/16"), AddressReason.PRIVATE),
    (_V4("198.18.0.0/15"), AddressReason.BENCHMARK),
    (_V4("198.51.100.0/24"), AddressReason.DOCUMENTATION),
    (_V4("203.0.113.0/24"), AddressReason.DOCUMENTATION),
    (_V4("224.0.0.0/4"), AddressReason.MULTICAST),
    (_V4("255.255.255.255/32"), AddressReason.BROADCAST),
    (_V4("240.0.0.0/4"), AddressReason.RESERVED),
)

_V6_TABLE: tuple[tuple[IPv6Network, AddressReason], ...] = (
    (_V6("::/128"), AddressReason.UNSPECIFIED),
    (_V6("::1/128"), AddressReason.LOOPBACK),
    (_V6("fd00:ec2::254/128"), AddressReason.METADATA),  # AWS instance metadata over IPv6
    (_V6("100::/64"), AddressReason.DISCARD),
    (_V6("2001:2::/48"), AddressReason.BENCHMARK),
    (_V6("2001:db8::/32"), AddressReason.DOCUMENTATION),
    (_V6("3fff::/20"), AddressReason.DOCUMENTATION),  # RFC 9637
    (_V6("2001::/23"), AddressReason.RESERVED),  # IETF protocol assignments (Teredo handled before)
    (_V6("fc00::/7"), AddressReason.UNIQUE_LOCAL),
    (_V6("fe80::/10"), AddressReason.LINK_LOCAL),
    (_V6("fec0::/10"), AddressReason.SITE_LOCAL),
    (_V6("ff00::/8"), AddressReason.MULTICAST),
)

_GLOBAL_UNICAST = _V6("2000::/3")
_IPV4_COMPATIBLE = _V6("::/96")  # deprecated (RFC 4291); :: and ::1 are matched before
_NAT64_WELL_KNOWN = _V6("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_NAT64_LOCAL = _V6("64:ff9b:1::/48")  # RFC 8215: the IPv4 address in bits 48..63 and 72..87 (RFC 6052 /48)


def classify(address: IPAddress) -> AddressReason | None:
    """Return why `address` is not a safe webhook destination, or None if it is globally routable.

    IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96 and
    64:ff9b:1::/48, 6to4 2002::/16, Teredo 2001::/32 server and client) are judged by that IPv4 address
    first, so ::ffff:127.0.0.1 is "loopback". Anything outside 2000::/3 or that Python's `is_global`
    rejects is at least "reserved".
    """
    if isinstance(address, IPv4Address):
        return _classify_v4(address)
    if isinstance(address, IPv6Address):
        return _classify_v6(address)
    raise TypeError("address must be an ipaddress.IPv4Address or IPv6Address")


def _classify_v4(address: IPv4Address) -> AddressReason | None:
    for network, reason in _V4_TABLE:
        if address in network:
            return reason
    return None if address.is_global else AddressReason.RESERVED


def _classify_v6(address: IPv6Address) -> AddressReason | None:
    if address.scope_id is not None:
        return AddressReason.SCOPED
    if address.ipv4_mapped is not None:
        return _classify_v4(address.ipv4_mapped)
    value = int(address)
    if address in _NAT64_WELL_KNOWN:
        return _classify_v4(IPv4Address(value & 0xFFFFFFFF))
    if address in _NAT64_LOCAL:
        embedded = IPv4Address(((value >> 64) & 0xFFFF) << 16 | ((value >> 40) & 0xFFFF))
        return _classify_v4(embedded) or AddressReason.PRIVATE
    if address in _IPV4_COMPATIBLE and value > 1:
        return _classify_v4(IPv4Address(value & 0xFFFFFFFF)) or AddressReason.RESERVED
    if address.sixtofour is not None:
        return _classify_v4(address.sixtofour)
    if address.teredo is not None:
        server, client = address.teredo
        return _classify_v4(server) or _classify_v4(client)
    for network, reason in _V6_TABLE:
        if address in network:
            return reason
    if address not in _GLOBAL_UNICAST or not address.is_global:
        return AddressReason.RESERVED
    return None


# --- URLs ---------------------------------------------------------------------------------------------

# scheme "://" authority path ["?" query] ["#" fragment]; the parts are checked one by one below.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(#.*)?", re.DOTALL)
# RFC 3986 pchar plus "/" (path) or "/" and "?" (query); percent-encodings must be complete.
_PATH = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
_QUERY = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_IPV6_LITERAL = re.compile(r"\[([0-9A-Fa-f:.]+)\]")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# What a lenient resolver or URL parser (WHATWG, inet_aton) would take as an IPv4 number: decimal,
# octal or hex in the last label makes the whole host an IPv4 address to them.
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9A-Fa-f]*|[0-9]+)")
_DOTTED_QUAD = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
)
# Dots that IDNA 2003 (Python's "idna" codec) also splits labels on.
_IDNA_DOTS = ("\u3002", "\uff0e", "\uff61")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def parse_url(url: str) -> ParsedUrl:
    """Parse a webhook URL strictly, without resolving it. Raises `UnsafeUrlError` (a `UrlReason`).

    Accepted: `https://` (or `http://`, decided later against the addresses) + host + optional `:port`
    + path + optional `?query`. Refused: userinfo, fragments, ports outside 1..65535 or with a leading
    zero, characters outside RFC 3986 in the path or query (spaces, backslashes, raw non-ASCII), zone
    ids, and numeric hosts other than a canonical dotted quad (2130706433, 0x7f.1, 017700000001, 127.1).
    Host names are converted to ASCII with IDNA and checked label by label.
    """
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_LENGTH:
        raise UnsafeUrlError(UrlReason.MALFORMED)
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in url):
        raise UnsafeUrlError(UrlReason.MALFORMED)
    match = _URL.fullmatch(url)
    if match is None:
        raise UnsafeUrlError(UrlReason.MALFORMED)
    scheme, authority, path, query, fragment = match.groups()
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UnsafeUrlError(UrlReason.SCHEME)
    if fragment is not None:
        raise UnsafeUrlError(UrlReason.FRAGMENT)
    if "@" in authority:
        raise UnsafeUrlError(UrlReason.USERINFO)
    if not path.isascii() or _PATH.fullmatch(path) is None:
        raise UnsafeUrlError(UrlReason.MALFORMED)
    if query is not None and (not query.isascii() or _QUERY.fullmatch(query) is None):
        raise UnsafeUrlError(UrlReason.MALFORMED)

    host_text, port = _split_authority(authority, _DEFAULT_PORTS[scheme])
    literal: IPAddress | None
    if host_text.startswith("["):
        literal = _ipv6_literal(host_text)
        host = str(literal)
    else:
        host = _host_name(host_text)
        literal = IPv4Address(host) if _DOTTED_QUAD.fullmatch(host) else None
    target = (path or "/") + (f"?{query}" if query is not None else "")
    return ParsedUrl(scheme, host, port, target, literal)


def check_addresses(
    parsed: ParsedUrl,
    addresses: Sequence[IPAddress],
    *,
    allow_http_loopback: bool,
    allow_networks: Sequence[IPNetwork] = (),
) -> ResolvedTarget:
    """Decide on the addresses `parsed.host` resolved to; return the target to connect to.

    Every address must be acceptable, not just one (a name resolving to one public and one private
    address is refused: the client might pick either). An address is acceptable if `classify` finds
    nothing against it, or it lies in one of `allow_networks` (metadata addresses excepted), or it is
    loopback and `allow_http_loopback` (development: a receiver on this machine) is set. `http` is
    accepted only with that switch and only if every address is loopback. IPv4-mapped IPv6 addresses
    are returned as IPv4. Raises `UnsafeUrlError`.
    """
    normalized: list[IPAddress] = []
    for address in addresses:
        if not isinstance(address, IPv4Address | IPv6Address):
            raise TypeError("the resolver must return ipaddress.IPv4Address or IPv6Address values")
        mapped = address.ipv4_mapped if isinstance(address, IPv6Address) else None
        normalized.append(mapped if mapped is not None else address)
    if not normalized:
        raise UnsafeUrlError(UrlReason.UNRESOLVABLE)

    all_loopback = True
    for address in normalized:
        reason = classify(address)
        all_loopback = all_loopback and reason is AddressReason.LOOPBACK
        if reason is None:
            continue
        if reason is AddressReason.LOOPBACK and allow_http_loopback:
            continue
        if reason is not AddressReason.METADATA and any(_contains(net, address) for net in allow_networks):
            continue
        raise UnsafeUrlError(reason)
    if parsed.scheme == "http" and not (allow_http_loopback and all_loopback):
        raise UnsafeUrlError(UrlReason.SCHEME)
    return ResolvedTarget(parsed.scheme, parsed.host, parsed.port, normalized[0], parsed.target)


def check_url(
    url: str,
    resolve: Callable[[str, int], Sequence[IPAddress]],
    *,
    allow_http_loopback: bool,
    allow_networks: Sequence[IPNetwork] = (),
) -> ResolvedTarget:
    """Parse `url`, resolve its host with `resolve(host, port)`, and check every address.

    IP-literal hosts are not resolved; they are checked the same way. `resolve` gets the ASCII host name
    and the port and returns the addresses (an `OSError` from it means "unresolvable"). The returned
    `ResolvedTarget.address` is the one to connect to. Raises `UnsafeUrlError`; see `parse_url` and
    `check_addresses`.
    """
    parsed = parse_url(url)
    if parsed.literal is not None:
        addresses: Sequence[IPAddress] = (parsed.literal,)
    else:
        try:
            addresses = resolve(parsed.host, parsed.port)
        except OSError:
            raise UnsafeUrlError(UrlReason.UNRESOLVABLE) from None
    return check_addresses(parsed, addresses, allow_http_loopback=allow_http_loopback, allow_networks=allow_networks)


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise UnsafeUrlError(UrlReason.HOST)
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UnsafeUrlError(UrlReason.HOST)
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if colon else None
    if not host:
        raise UnsafeUrlError(UrlReason.HOST)
    if port_text is None:
        return host, default_port
    if not port_text.isascii() or _PORT.fullmatch(port_text) is None or int(port_text) > 65535:
        raise UnsafeUrlError(UrlReason.PORT)
    return host, int(port_text)


def _ipv6_literal(text: str) -> IPv6Address:
    match = _IPV6_LITERAL.fullmatch(text)  # no zone id: "%" is not allowed
    if match is None:
        raise UnsafeUrlError(UrlReason.HOST)
    try:
        return IPv6Address(match.group(1))
    except ipaddress.AddressValueError:
        raise UnsafeUrlError(UrlReason.HOST) from None


def _host_name(text: str) -> str:
    """The lower-case ASCII form of a host name or dotted quad; `UnsafeUrlError` if it is neither."""
    if "%" in text or any(dot in text for dot in _IDNA_DOTS):
        raise UnsafeUrlError(UrlReason.HOST)
    if not text.isascii():
        try:
            # IDNA 2003 nameprep maps look-alikes (fullwidth digits, case) to ASCII: the checks below
            # run on the result, so "１２７.０.０.１" is judged as 127.0.0.1.
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise UnsafeUrlError(UrlReason.HOST) from None
    host = text.lower()
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        if _DOTTED_QUAD.fullmatch(host) is None:
            raise UnsafeUrlError(UrlReason.IP_SHORTHAND)
        return host
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UnsafeUrlError(UrlReason.HOST)
    return host


def _contains(network: IPNetwork, address: IPAddress) -> bool:
    # `in` across IP versions is simply False, but mypy wants the versions paired.
    if isinstance(network, IPv4Network):
        return isinstance(address, IPv4Address) and address in network
    return isinstance(address, IPv6Address) and address in network
