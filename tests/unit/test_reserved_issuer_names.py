"""Which names a key may be registered under: printable ASCII, and not under `urn:bedside:` (the service's
own). No case, width, look-alike letter or invisible character makes another name read as one of the
service's own in the audit log, and no ordinary issuer name is taken for one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain.issuers import RESERVED_ISSUER_PREFIX, is_reserved_issuer, issuer_name_refusal

_ascii_rest = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
_not_ascii = st.characters(min_codepoint=0x80, blacklist_categories=("Cs",))


@given(rest=_ascii_rest, upper=st.lists(st.booleans(), min_size=12, max_size=12))
def test_a_name_under_the_prefix_in_any_case_is_reserved(rest: str, upper: list[bool]) -> None:
    prefix = "".join(c.upper() if up else c for c, up in zip(RESERVED_ISSUER_PREFIX, upper, strict=True))
    assert issuer_name_refusal(prefix + rest) == "reserved-issuer-name"
    assert issuer_name_refusal(f"  {prefix}{rest}") == "reserved-issuer-name"


@given(before=_ascii_rest, stand_in=_not_ascii, after=_ascii_rest)
def test_a_name_with_any_character_beyond_ascii_anywhere_is_refused(before: str, stand_in: str, after: str) -> None:
    assert issuer_name_refusal(before + stand_in + after) == "issuer-name-not-ascii"


@pytest.mark.parametrize(
    "name",
    [
        "urn:bedside\uff1adev-issuer",  # full-width colon
        "\uff35\uff32\uff2e:BEDSIDE:webhook",  # full-width capitals
        "urn:b\u0435dside:dev-issuer",  # Cyrillic ie
        "urn\ua789bedside\ua789x",  # modifier letter colon
        "urn:be\u0301dside:x",  # an accent over the e
        "urn:\u3164bedside:dev-issuer",  # Hangul filler: printable, blank on screen
        "\u115furn:bedside:dev-issuer",  # Hangul choseong filler: nothing on screen, strip() keeps it
        "urn:bed\u034fside:dev-issuer",  # combining grapheme joiner: no glyph of its own
        "urn:bed\u17b4side:dev-issuer",  # Khmer vowel inherent aq: no glyph of its own
        "URN:BEDS\u0130DE:dev-issuer",  # a dotted capital I, which casefolds to two characters
    ],
)
def test_names_that_read_as_the_services_own_cannot_be_registered(name: str) -> None:
    assert issuer_name_refusal(name) is not None


@pytest.mark.parametrize(
    "name",
    [
        "https://portal.acme.test",
        "https://xn--portl-dra.example",  # an internationalized host, as it is written in a URL
        "urn:bedsid:x",  # one letter short
        "urn:bedsides:x",
        "urn:bedside",  # not in the namespace: no colon after it
        "urn:example:bedside:x",
        "https://bedside.example/urn:bedside:x",
    ],
)
def test_ordinary_names_may_be_registered(name: str) -> None:
    assert not is_reserved_issuer(name)
    assert issuer_name_refusal(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "\u533b\u7642\u60c5\u5831\u9023\u643a\u30dd\u30fc\u30bf\u30eb\u682a\u5f0f\u4f1a\u793e",  # Japanese
        "\u0431\u043e\u043b\u044c\u043d\u0438\u0447\u043d\u044b\u0439\u043f\u043e\u0440\u0442\u0430\u043b",  # Cyrillic
    ],
)
def test_a_name_in_another_script_is_not_taken_for_the_services_own(name: str) -> None:
    """It is refused as not ASCII, and so said: not as reserved, which it does not read as."""
    assert not is_reserved_issuer(name)
    assert issuer_name_refusal(name) == "issuer-name-not-ascii"
