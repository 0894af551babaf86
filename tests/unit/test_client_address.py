"""The client's address behind trusted proxies: X-Forwarded-For read from the right, past the proxies' own
addresses, never further than the first address nobody vouches for, and never a value that is no address."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.client_address import MAX_FORWARDED_HOPS, client_address

TRUSTED = (ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32"), ip_network("fd00::/8"))
PROXY = "10.0.0.5"
CLIENT = "198.51.100.7"


def _of(*fields: str, peer: str | None = PROXY) -> str | None:
    return client_address(peer, fields, TRUSTED)


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert client_address(PROXY, [CLIENT], ()) == PROXY


def test_a_peer_outside_the_trusted_networks_is_the_client_whatever_the_header_says() -> None:
    assert _of(CLIENT, peer="203.0.113.9") == "203.0.113.9"
    assert _of(CLIENT, peer=None) is None
    assert _of(CLIENT, peer="") == ""  # a Unix socket's peer: no address at all


def test_behind_a_trusted_proxy_the_client_is_the_address_the_proxy_appended() -> None:
    assert _of(CLIENT) == CLIENT
    assert _of(CLIENT, peer="::ffff:10.0.0.5") == CLIENT  # the proxy, as a dual-stack socket shows it


def test_a_spoofed_leftmost_entry_does_not_choose_the_address() -> None:
    # The client sent "X-Forwarded-For: 203.0.113.66"; the proxy appended the address it saw.
    assert _of(f"203.0.113.66, {CLIENT}") == CLIENT
    assert _of("203.0.113.66", CLIENT) == CLIENT  # as a field of its own, before the proxy's


def test_trusted_hops_are_passed_from_the_right_to_the_first_untrusted_address() -> None:
    assert _of(f"203.0.113.66, {CLIENT}, 10.1.1.1, fd00::2") == CLIENT
    assert _of(f"203.0.113.66, {CLIENT}", "10.1.1.1", " , fd00::2 ,") == CLIENT  # every field, empty elements too


def test_when_every_address_is_trusted_the_leftmost_is_the_client() -> None:
    assert _of("10.1.1.1, 10.2.2.2") == "10.1.1.1"


@pytest.mark.parametrize("fields", [(), ("",), (" ",), (" , ,",), ("", "")])
def test_without_a_forwarded_address_the_trusted_peer_is_the_client(fields: tuple[str, ...]) -> None:
    assert _of(*fields) == PROXY


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bogus", PROXY),
        ("unknown", PROXY),  # what nginx's $proxy_add_x_forwarded_for never writes, but some proxies do
        (f"{CLIENT}, bogus", PROXY),
        (f"{CLIENT}, bogus, 10.1.1.1", "10.1.1.1"),  # the last trusted hop reached
        (f"bogus, {CLIENT}", CLIENT),  # left of the client: never read
        ("198.51.100.7/32", PROXY),
        ("198.51.100.7:", PROXY),
        ("198.51.100.7:123456", PROXY),
        ("198.51.100.7:80:80", PROXY),
        ("[198.51.100.7]", PROXY),
        ("[2001:db8::7", PROXY),
        ("[2001:db8::7]x", PROXY),
        ("[2001:db8::7]:", PROXY),
        ("fe80::1%eth0", PROXY),  # a zone id is text of the writer's choosing
        ("01.2.3.4", PROXY),
        ("१.२.३.४", PROXY),  # digits, but not ASCII ones
        (CLIENT + " " * 100, CLIENT),
        ("9" * 100_000, PROXY),
    ],
)
def test_an_entry_that_is_no_address_stops_at_the_last_trusted_hop(header: str, expected: str) -> None:
    assert _of(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("198.51.100.7:4711", CLIENT),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("2001:DB8:0::7", "2001:db8::7"),
        ("::ffff:198.51.100.7", CLIENT),
        ("\t198.51.100.7 ", CLIENT),
    ],
)
def test_an_address_is_read_in_the_forms_proxies_write_and_given_in_canonical_form(header: str, expected: str) -> None:
    assert _of(header) == expected


def test_only_the_last_entries_are_read_however_long_the_header() -> None:
    hops = [f"10.0.{n // 256}.{n % 256}" for n in range(1, 1001)]
    # A client behind a thousand trusted hops is out of reach: the leftmost hop read is the answer.
    leftmost_read = hops[-MAX_FORWARDED_HOPS]
    assert _of(", ".join([CLIENT, *hops])) == leftmost_read
    assert _of(CLIENT, *hops) == leftmost_read
    assert _of(f"{CLIENT}, 10.0.0.1") == CLIENT


# --- properties ------------------------------------------------------------------------------------------------

_PEERS = st.one_of(st.none(), st.just(PROXY), st.just("127.0.0.1"), st.ip_addresses().map(str), st.text(max_size=50))


def _is_trusted(text: str) -> bool:
    address = ip_address(text)
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in TRUSTED)


def _is_trusted_peer(peer: str | None) -> bool:
    try:
        return peer is not None and _is_trusted(peer)
    except ValueError:
        return False


@dataclass(frozen=True)
class Entry:
    text: str  # as written in the header
    address: str | None  # the address it names, canonical; None for junk and empty elements
    empty: bool = False

    @property
    def trusted(self) -> bool:
        return self.address is not None and _is_trusted(self.address)


@st.composite
def _addresses(draw: st.DrawFn, trusted: bool) -> Entry:
    if trusted:
        address: IPv4Address | IPv6Address = draw(
            st.one_of(
                st.ip_addresses(network="10.0.0.0/8"),
                st.ip_addresses(network="fd00::/8"),
                st.just(IPv4Address("127.0.0.1")),
            )
        )
    else:
        address = draw(st.ip_addresses().filter(lambda a: not _is_trusted(str(a))))
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    text = str(address)
    if isinstance(address, IPv4Address):
        form = draw(st.sampled_from(["plain", "port", "mapped"]))
        text = {"plain": text, "port": f"{text}:{draw(st.integers(0, 65535))}", "mapped": f"::ffff:{text}"}[form]
    else:
        form = draw(st.sampled_from(["plain", "upper", "brackets", "port"]))
        text = {"plain": text, "upper": text.upper(), "brackets": f"[{text}]", "port": f"[{text}]:443"}[form]
    space = draw(st.sampled_from(["", " ", "\t", "  "]))
    return Entry(f"{space}{text}{space[::-1]}", str(address))


# Junk is never an address: "x" is in no form of one. No commas: each entry is one element of the list.
_JUNK = st.text(st.characters(exclude_characters=","), max_size=20).map(lambda s: Entry("x" + s, None))
_EMPTY = st.sampled_from(["", " ", "\t"]).map(lambda s: Entry(s, None, empty=True))
_ENTRIES = st.one_of(_addresses(trusted=True), _addresses(trusted=False), _JUNK, _EMPTY)


@st.composite
def _header(draw: st.DrawFn) -> tuple[list[Entry], list[str]]:
    """Entries, and the header fields they are sent in (one list, cut anywhere into several fields)."""
    entries = draw(st.lists(_ENTRIES, max_size=MAX_FORWARDED_HOPS + 8))
    fields: list[str] = []
    start = 0
    while start < len(entries):
        end = draw(st.integers(start + 1, len(entries)))
        fields.append(",".join(e.text for e in entries[start:end]))
        start = end
    return entries, fields


@settings(max_examples=300, deadline=None)
@given(header=_header())
def test_behind_a_trusted_proxy_the_client_is_the_first_untrusted_address_from_the_right(
    header: tuple[list[Entry], list[str]],
) -> None:
    entries, fields = header
    read = entries[-MAX_FORWARDED_HOPS:]
    # The trusted tail of what is read, empty elements skipped; and what stands left of it, if anything.
    tail = len(read)
    while tail > 0 and (read[tail - 1].empty or read[tail - 1].trusted):
        tail -= 1
    hops = [e.address for e in read[tail:] if not e.empty]
    stop = read[tail - 1] if tail > 0 else None

    found = client_address(PROXY, fields, TRUSTED)

    if stop is not None and stop.address is not None:
        assert found == stop.address  # an address the header named, not a trusted one: the client
        assert not _is_trusted(found)
    else:
        # Junk ends the walk, and so does the end of what is read: the last trusted hop reached (the
        # leftmost of the tail, or the proxy itself when the header names no trusted hop either).
        assert found == (hops[0] if hops else PROXY)
        assert found is not None
        assert _is_trusted(found)


# Header text of every kind: arbitrary, and addresses in every form mixed with arbitrary separators.
_FIELDS = st.lists(
    st.one_of(
        st.text(max_size=80),
        st.lists(st.one_of(_ENTRIES.map(lambda e: e.text), st.text(max_size=10)), max_size=40).map(",".join),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(peer=_PEERS, fields=_FIELDS)
def test_arbitrary_header_text_never_raises_and_never_becomes_the_address(peer: str | None, fields: list[str]) -> None:
    found = client_address(peer, fields, TRUSTED)

    if found != peer:
        assert _is_trusted_peer(peer)  # only a trusted proxy's header is read at all
        assert found is not None
        assert str(ip_address(found)) == found  # an address in its canonical form, nothing else a client wrote
