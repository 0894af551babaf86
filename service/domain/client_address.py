"""The client's address: the TCP peer's, or, when the peer is a trusted proxy, the one the proxies forwarded.

Behind a load balancer or reverse proxy every request comes from the proxy's address: the audit events'
source and the failed-authentication limiter's budget would be the proxy's, shared by every client. With
the proxies' networks configured (`BEDSIDE_TRUSTED_PROXIES`), a request whose peer is in one of them has
its client found in `X-Forwarded-For`. Each proxy appends the address it received the request from, so the
list is read from the right, past the trusted proxies' own addresses: the first address that is not one is
the client's. What lies left of it was written by the client itself (or by a proxy nobody vouches for), so
it is never read: a client cannot choose its own address.

Only `X-Forwarded-For` is read. RFC 7239's `Forwarded` is ignored: the proxies in use write the former,
and reading both would leave the question which one a proxy appended to and which one the client wrote.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

# Entries of the header considered, from the right: the hops of any real chain of proxies, and a bound on
# what a long header may cost (every entry past it is left unread, not even split off).
MAX_FORWARDED_HOPS = 32
# The longest entry that can be an address: `[0000:0000:0000:0000:0000:ffff:255.255.255.255]:65535` is 53.
_LONGEST_ENTRY = 64


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The address a request counts as coming from: the audit events' source, the limiter's key.

    `peer` is the TCP peer's address, `forwarded_for` every X-Forwarded-For field of the request in order
    (one comma-separated list), `trusted` the networks of the proxies in front of the service.

    A peer outside `trusted` is the client, whatever the header says. Otherwise the header's entries are
    walked from the right, at most MAX_FORWARDED_HOPS of them (empty ones skipped): the first address not in
    `trusted` is the client's, in its canonical form. An entry that is not an address stops the walk: the
    answer is then the last trusted hop reached (the peer, or a proxy's entry), never a value that did not
    parse; so is a missing or empty header. When every address is trusted, the leftmost one walked.
    """
    hop = _parse(peer) if peer else None
    if hop is None or not _trusted(hop, trusted):
        return peer
    reached = peer
    for entry in _from_the_right(forwarded_for, MAX_FORWARDED_HOPS):
        entry = entry.strip(" \t")
        if not entry:
            continue  # an empty list element (RFC 9110 section 5.6.1): nothing to read
        address = _forwarded(entry)
        if address is None:
            break
        reached = str(address)
        if not _trusted(address, trusted):
            break
    return reached


def _from_the_right(fields: Sequence[str], limit: int) -> Iterator[str]:
    """The list elements of `fields` (the fields of one header, in order, as one comma-separated list),
    from the right, at most `limit` of them; what lies left of those is never split."""
    for field in reversed(fields):
        parts = field.rsplit(",", limit)
        for part in reversed(parts[-limit:]):
            yield part
            limit -= 1
            if limit == 0:
                return


def _forwarded(entry: str) -> Address | None:
    """An X-Forwarded-For entry's address: `192.0.2.1`, `2001:db8::1`, or with a port that some proxies add
    (`192.0.2.1:443`, `[2001:db8::1]:443`, also `[2001:db8::1]`). None for anything else, a zone id
    (`fe80::1%eth0`, text of the writer's choosing) included."""
    if len(entry) > _LONGEST_ENTRY:
        return None
    host = entry
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or ":" not in host or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None  # brackets hold an IPv6 address, and nothing but a port may follow them
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if not _is_port(port) or "." not in host:
            return None  # one colon: an IPv4 address with its port
    address = _parse(host)
    if address is None or (isinstance(address, IPv6Address) and address.scope_id is not None):
        return None
    return address


def _is_port(text: str) -> bool:
    return 1 <= len(text) <= 5 and text.isascii() and text.isdigit()


def _parse(text: str) -> Address | None:
    """An address, an IPv4-mapped IPv6 address as the IPv4 address it is; None if `text` is none."""
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)
