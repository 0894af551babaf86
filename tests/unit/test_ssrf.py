"""Webhook URLs: only globally routable destinations, parsed strictly, connected to by checked address."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.ssrf import (
    AddressReason,
    IPAddress,
    ResolvedTarget,
    UnsafeUrlError,
    UrlReason,
    check_addresses,
    check_url,
    classify,
    parse_url,
)
from service.errors import DomainError

A = AddressReason
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1::"
TOKEN = "s3cr3t-t0ken"

# (address, expected reason or None if globally routable)
ADDRESSES: list[tuple[str, AddressReason | None]] = [
    (PUBLIC_V4, None),
    (PUBLIC_V6, None),
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("2001:4860:4860::8888", None),
    ("0.0.0.0", A.UNSPECIFIED),  # noqa: S104 - an address to classify, not one to bind
    ("0.1.2.3", A.UNSPECIFIED),
    ("::", A.UNSPECIFIED),
    ("127.0.0.1", A.LOOPBACK),
    ("127.255.255.254", A.LOOPBACK),
    ("::1", A.LOOPBACK),
    ("10.0.0.1", A.PRIVATE),
    ("172.16.0.1", A.PRIVATE),
    ("172.31.255.255", A.PRIVATE),
    ("192.168.1.1", A.PRIVATE),
    ("172.32.0.1", None),
    ("100.64.0.1", A.CGNAT),
    ("100.127.255.255", A.CGNAT),
    ("100.128.0.1", None),
    ("169.254.0.1", A.LINK_LOCAL),
    ("fe80::1", A.LINK_LOCAL),
    ("febf::1", A.LINK_LOCAL),
    ("169.254.169.254", A.METADATA),
    ("169.254.170.2", A.METADATA),
    ("100.100.100.200", A.METADATA),
    ("fd00:ec2::254", A.METADATA),
    ("224.0.0.1", A.MULTICAST),
    ("239.255.255.250", A.MULTICAST),
    ("ff02::1", A.MULTICAST),
    ("ff0e::1", A.MULTICAST),
    ("255.255.255.255", A.BROADCAST),
    ("240.0.0.1", A.RESERVED),
    ("192.0.0.8", A.RESERVED),
    ("192.88.99.1", A.RESERVED),
    ("192.0.2.1", A.DOCUMENTATION),
    ("198.51.100.7", A.DOCUMENTATION),
    ("203.0.113.9", A.DOCUMENTATION),
    ("2001:db8::1", A.DOCUMENTATION),
    ("3fff::1", A.DOCUMENTATION),
    ("198.18.0.1", A.BENCHMARK),
    ("198.19.255.255", A.BENCHMARK),
    ("2001:2::1", A.BENCHMARK),
    ("fc00::1", A.UNIQUE_LOCAL),
    ("fd12:3456::1", A.UNIQUE_LOCAL),
    ("fec0::1", A.SITE_LOCAL),
    ("100::1", A.DISCARD),
    ("2001:10::1", A.RESERVED),  # ORCHID, inside the IETF protocol assignments
    ("5f00::1", A.RESERVED),  # outside 2000::/3
    ("4000::1", A.RESERVED),
    ("fe80::1%eth0", A.SCOPED),
    # IPv4-mapped
    ("::ffff:127.0.0.1", A.LOOPBACK),
    ("::ffff:7f00:1", A.LOOPBACK),
    ("::ffff:169.254.169.254", A.METADATA),
    ("::ffff:10.1.2.3", A.PRIVATE),
    (f"::ffff:{PUBLIC_V4}", None),
    # IPv4-compatible (deprecated): never acceptable
    ("::127.0.0.1", A.LOOPBACK),
    ("::10.0.0.1", A.PRIVATE),
    (f"::{PUBLIC_V4}", A.RESERVED),
    # NAT64, well-known prefix (RFC 6052): judged by the embedded address
    ("64:ff9b::127.0.0.1", A.LOOPBACK),
    ("64:ff9b::a9fe:a9fe", A.METADATA),
    ("64:ff9b::10.0.0.1", A.PRIVATE),
    (f"64:ff9b::{PUBLIC_V4}", None),
    # NAT64, local-use prefix (RFC 8215): 127.0.0.1 is 7f00 in bits 48..63 and 0001 in bits 72..87
    ("64:ff9b:1:7f00:0:100::", A.LOOPBACK),
    ("64:ff9b:1:a9fe:a9:fe00::", A.METADATA),
    ("64:ff9b:1:5db8:d8:2200::", A.PRIVATE),  # 93.184.216.34 inside: the prefix itself is local-use
    # 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD
    ("2002:7f00:1::1", A.LOOPBACK),
    ("2002:a9fe:a9fe::1", A.METADATA),
    ("2002:c0a8:101::1", A.PRIVATE),
    ("2002:5db8:d822::1", None),
    # Teredo: server in bits 32..63, client obfuscated (inverted) in the last 32 bits
    ("2001:0:7f00:1::5db8:d822", A.LOOPBACK),  # server 127.0.0.1
    ("2001:0:5db8:d822::80ff:fefe", A.LOOPBACK),  # client ~0x80fffefe = 127.0.1.1
    ("2001:0:5db8:d822::f5ff:fffe", A.PRIVATE),  # client 10.0.0.1
    ("2001:0:5db8:d822::a247:2727", None),  # server and client 93.184.216.34 and 93.184.216.216
]


@pytest.mark.parametrize(("text", "expected"), ADDRESSES, ids=[a for a, _ in ADDRESSES])
def test_classify(text: str, expected: AddressReason | None) -> None:
    assert classify(ip_address(text)) == expected


def test_classify_refuses_anything_but_an_address() -> None:
    with pytest.raises(TypeError):
        classify("127.0.0.1")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(value=st.integers(0, 2**32 - 1))
def test_every_ipv4_address_python_calls_non_global_is_refused(value: int) -> None:
    address = IPv4Address(value)
    if not address.is_global or address.is_multicast:
        assert classify(address) is not None
        # and the same address inside any IPv6 embedding is refused for the same reason
        assert classify(IPv6Address(f"::ffff:{address}")) == classify(address)
        assert classify(IPv6Address(f"64:ff9b::{address}")) == classify(address)
        assert classify(IPv6Address((0x2002 << 112) | (value << 80) | 1)) == classify(address)


# --- URLs --------------------------------------------------------------------------------------------------------


def resolver(table: dict[str, Sequence[str]]) -> Callable[[str, int], Sequence[IPAddress]]:
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> Sequence[IPAddress]:
        calls.append((host, port))
        if host not in table:
            raise OSError("no such host")
        return [ip_address(a) for a in table[host]]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


DNS = resolver(
    {
        "hooks.example.com": [PUBLIC_V4, PUBLIC_V6],
        "v6only.example.com": [PUBLIC_V6],
        "internal.example.com": ["10.0.0.5"],
        "mixed.example.com": [PUBLIC_V4, "10.0.0.5"],
        "mixed-v6.example.com": [PUBLIC_V6, "fd00::5"],
        "metadata.example.com": ["169.254.169.254"],
        "mapped.example.com": ["::ffff:93.184.216.34"],
        "localhost": ["127.0.0.1", "::1"],
        "half-local.example.com": ["127.0.0.1", PUBLIC_V4],
        "local-last.example.com": [PUBLIC_V4, "127.0.0.1"],
        "empty.example.com": [],
        "xn--bcher-kva.example": [PUBLIC_V4],
        "partner.internal": ["10.20.0.7"],
    }
)


def check(url: str, *, dev: bool = False, allow: Sequence[str] = ()) -> ResolvedTarget:
    return check_url(url, DNS, allow_http_loopback=dev, allow_networks=[ip_network(n) for n in allow])


def refusal(url: str, *, dev: bool = False, allow: Sequence[str] = ()) -> str:
    with pytest.raises(UnsafeUrlError) as caught:
        check(url, dev=dev, allow=allow)
    message = str(caught.value)
    assert TOKEN not in message
    assert not url or url not in message
    return caught.value.reason


def test_a_public_https_url_gives_the_checked_address_to_connect_to() -> None:
    target = check(f"https://hooks.example.com/bedside/{TOKEN}?k={TOKEN}")
    assert target == ResolvedTarget(
        "https", "hooks.example.com", 443, ip_address(PUBLIC_V4), f"/bedside/{TOKEN}?k={TOKEN}"
    )
    assert TOKEN not in repr(target)


def test_defaults_and_normalization() -> None:
    assert check("HTTPS://Hooks.Example.COM").path == "/"
    assert check("https://hooks.example.com:8443/x").port == 8443
    assert check("https://hooks.example.com?x=1").path == "/?x=1"
    assert check("https://v6only.example.com/").address == ip_address(PUBLIC_V6)
    # an IPv4-mapped answer is connected to as IPv4
    assert check("https://mapped.example.com/").address == IPv4Address(PUBLIC_V4)


def test_the_resolver_is_given_the_ascii_host_and_port() -> None:
    target = check("https://bücher.example:444/")
    assert target.host == "xn--bcher-kva.example"
    assert DNS.calls[-1] == ("xn--bcher-kva.example", 444)  # type: ignore[attr-defined]


def test_ip_literal_hosts_are_not_resolved_and_are_checked_the_same_way() -> None:
    before = len(DNS.calls)  # type: ignore[attr-defined]
    assert check(f"https://{PUBLIC_V4}/x").address == IPv4Address(PUBLIC_V4)
    assert check(f"https://[{PUBLIC_V6}]:8443/x").address == IPv6Address(PUBLIC_V6)
    assert check(f"https://[{PUBLIC_V6}]/").host == PUBLIC_V6
    assert len(DNS.calls) == before  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        # any private answer refuses the name, even next to a public one
        ("https://internal.example.com/", A.PRIVATE),
        ("https://mixed.example.com/", A.PRIVATE),
        ("https://mixed-v6.example.com/", A.UNIQUE_LOCAL),
        ("https://metadata.example.com/", A.METADATA),
        ("https://localhost/", A.LOOPBACK),
        ("https://ｌｏｃａｌｈｏｓｔ/", A.LOOPBACK),  # IDNA maps it to "localhost", which is what is resolved
        ("https://half-local.example.com/", A.LOOPBACK),
        ("https://empty.example.com/", UrlReason.UNRESOLVABLE),
        ("https://nowhere.example.com/", UrlReason.UNRESOLVABLE),
        # IP literals
        ("https://127.0.0.1/", A.LOOPBACK),
        ("https://169.254.169.254/latest/meta-data/", A.METADATA),
        ("https://100.100.100.200/", A.METADATA),
        ("https://[fd00:ec2::254]/", A.METADATA),
        ("https://[::1]/", A.LOOPBACK),
        ("https://[0:0:0:0:0:0:0:1]/", A.LOOPBACK),
        ("https://[::ffff:127.0.0.1]/", A.LOOPBACK),
        ("https://[::ffff:a9fe:a9fe]/", A.METADATA),
        ("https://[64:ff9b::10.0.0.1]/", A.PRIVATE),
        ("https://[2002:7f00:1::1]/", A.LOOPBACK),
        ("https://[fec0::1]/", A.SITE_LOCAL),
        ("https://[100::1]/", A.DISCARD),
        ("https://0.0.0.0/", A.UNSPECIFIED),
        ("https://100.64.1.1/", A.CGNAT),
        ("https://255.255.255.255/", A.BROADCAST),
        # numeric shorthands that lenient parsers and resolvers turn into 127.0.0.1
        ("https://2130706433/", UrlReason.IP_SHORTHAND),
        ("https://0x7f000001/", UrlReason.IP_SHORTHAND),
        ("https://0x7f.1/", UrlReason.IP_SHORTHAND),
        ("https://0x7F.0.0.1/", UrlReason.IP_SHORTHAND),
        ("https://017700000001/", UrlReason.IP_SHORTHAND),
        ("https://0177.0.0.1/", UrlReason.IP_SHORTHAND),
        ("https://127.1/", UrlReason.IP_SHORTHAND),
        ("https://127.0.1/", UrlReason.IP_SHORTHAND),
        ("https://127.0.0.01/", UrlReason.IP_SHORTHAND),
        ("https://127.0.0.1.1/", UrlReason.IP_SHORTHAND),
        ("https://256.0.0.1/", UrlReason.IP_SHORTHAND),
        ("https://example.0x1/", UrlReason.IP_SHORTHAND),
        ("https://１２７.０.０.１/", A.LOOPBACK),  # fullwidth digits: IDNA maps them to 127.0.0.1
        ("https://①②⑦.0.0.1/", A.LOOPBACK),  # so do circled digits
        ("https://０ｘ７ｆ.１/", UrlReason.IP_SHORTHAND),  # and a fullwidth hex shorthand is still one
        # structure
        ("http://hooks.example.com/", UrlReason.SCHEME),
        ("ftp://hooks.example.com/", UrlReason.SCHEME),
        ("file:///etc/passwd", UrlReason.SCHEME),
        ("gopher://127.0.0.1:6379/_INFO", UrlReason.SCHEME),
        ("//hooks.example.com/", UrlReason.MALFORMED),
        ("hooks.example.com/x", UrlReason.MALFORMED),
        ("https://user:pass@hooks.example.com/", UrlReason.USERINFO),
        ("https://hooks.example.com@127.0.0.1/", UrlReason.USERINFO),
        ("https://@hooks.example.com/", UrlReason.USERINFO),
        ("https://hooks.example.com/#frag", UrlReason.FRAGMENT),
        ("https://hooks.example.com/#", UrlReason.FRAGMENT),
        ("https://hooks.example.com:0/", UrlReason.PORT),
        ("https://hooks.example.com:65536/", UrlReason.PORT),
        ("https://hooks.example.com:0443/", UrlReason.PORT),
        ("https://hooks.example.com:/", UrlReason.PORT),
        ("https://hooks.example.com:+443/", UrlReason.PORT),
        ("https://hooks.example.com:١٢٣/", UrlReason.PORT),
        ("https://[::1]x/", UrlReason.HOST),
        ("https://[fe80::1%25eth0]/", UrlReason.HOST),
        ("https://[v1.fe80::1]/", UrlReason.HOST),
        ("https://[127.0.0.1]/", UrlReason.HOST),
        ("https:///x", UrlReason.HOST),
        ("https://hooks.example.com./", UrlReason.HOST),
        ("https://hooks..example.com/", UrlReason.HOST),
        ("https://hooks_1.example.com/", UrlReason.HOST),
        ("https://-hooks.example.com/", UrlReason.HOST),
        ("https://hooks%2eexample.com/", UrlReason.HOST),
        ("https://hooks。example.com/", UrlReason.HOST),
        ("https://" + "a" * 64 + ".example.com/", UrlReason.HOST),
        ("https://hooks.example.com\\@127.0.0.1/", UrlReason.MALFORMED),
        ("https://hooks.example.com/a b", UrlReason.MALFORMED),
        ("https://hooks.example.com/\r\nX-Injected: 1", UrlReason.MALFORMED),
        ("https://hooks.example.com/é", UrlReason.MALFORMED),
        ("https://hooks.example.com/%zz", UrlReason.MALFORMED),
        ("https://hooks.example.com/?q=<script>", UrlReason.MALFORMED),
        ("https://hooks.example.com/" + "a" * 2048, UrlReason.MALFORMED),
        ("", UrlReason.MALFORMED),
    ],
)
def test_refused(url: str, reason: str) -> None:
    assert refusal(url) == reason


def test_http_is_only_for_loopback_with_the_development_switch() -> None:
    assert check("http://localhost:8080/hook", dev=True).address == IPv4Address("127.0.0.1")
    assert check("http://127.0.0.1:8080/hook", dev=True).scheme == "http"
    assert check("http://[::1]:8080/hook", dev=True).address == IPv6Address("::1")
    assert check("https://localhost:8443/hook", dev=True).port == 8443
    assert refusal("http://localhost:8080/hook") == A.LOOPBACK
    assert refusal("http://hooks.example.com/", dev=True) == UrlReason.SCHEME
    assert refusal("http://half-local.example.com/", dev=True) == UrlReason.SCHEME
    # the switch opens loopback, nothing else
    assert refusal("http://internal.example.com/", dev=True) == A.PRIVATE
    assert refusal("https://169.254.169.254/", dev=True) == A.METADATA


def test_the_development_switch_opens_neither_a_public_answer_nor_the_unspecified_address() -> None:
    # http needs every answer to be loopback, whichever order the resolver gives them in.
    assert refusal("http://local-last.example.com:8080/hook", dev=True) == UrlReason.SCHEME
    # 0.0.0.0 and :: reach this machine's services on Linux, yet they are not loopback: still refused.
    assert refusal("http://0.0.0.0:8080/hook", dev=True) == A.UNSPECIFIED
    assert refusal("http://[::]:8080/hook", dev=True) == A.UNSPECIFIED


def test_the_allow_list_opens_exactly_its_networks_and_never_metadata() -> None:
    target = check("https://partner.internal/hook", allow=["10.20.0.0/16"])
    assert target.address == IPv4Address("10.20.0.7")
    assert refusal("https://partner.internal/hook", allow=["10.21.0.0/16"]) == A.PRIVATE
    assert refusal("https://partner.internal/hook", allow=["fd00::/8"]) == A.PRIVATE
    assert refusal("https://mixed.example.com/", allow=["10.20.0.0/16"]) == A.PRIVATE
    assert refusal("https://metadata.example.com/", allow=["169.254.0.0/16"]) == A.METADATA
    assert refusal("https://[fd00:ec2::254]/", allow=["fc00::/7"]) == A.METADATA
    assert check("https://[fd00::5]/", allow=["fc00::/7"]).address == IPv6Address("fd00::5")
    # http stays closed even to an allow-listed network
    assert refusal("http://partner.internal/hook", allow=["10.20.0.0/16"]) == UrlReason.SCHEME


def test_a_resolver_error_is_unresolvable_and_other_errors_propagate() -> None:
    def broken(host: str, port: int) -> Sequence[IPAddress]:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        check_url("https://hooks.example.com/", broken, allow_http_loopback=False)

    def wrong_type(host: str, port: int) -> Sequence[IPAddress]:
        return ["93.184.216.34"]  # type: ignore[list-item]

    with pytest.raises(TypeError):
        check_url("https://hooks.example.com/", wrong_type, allow_http_loopback=False)


def test_async_callers_parse_then_check_what_they_resolved() -> None:
    parsed = parse_url(f"https://hooks.example.com/{TOKEN}")
    assert TOKEN not in repr(parsed)
    target = check_addresses(parsed, [ip_address(PUBLIC_V6)], allow_http_loopback=False)
    assert target.address == IPv6Address(PUBLIC_V6)
    with pytest.raises(UnsafeUrlError):
        check_addresses(parsed, [ip_address(PUBLIC_V6), ip_address("::1")], allow_http_loopback=False)


def test_the_error_is_a_domain_error_with_a_fixed_message() -> None:
    with pytest.raises(UnsafeUrlError) as caught:
        check(f"https://internal.example.com/{TOKEN}")
    error = caught.value
    assert isinstance(error, DomainError)
    assert error.code == "unsafe-url"
    assert error.reason is A.PRIVATE
    assert "internal.example.com" not in str(error)
    assert "10.0.0.5" not in str(error)
