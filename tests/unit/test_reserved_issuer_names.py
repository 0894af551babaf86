"""The service's own issuer names (`urn:bedside:...`) as a reader of the audit log sees them: no case, width
or look-alike letter makes another name read as one of them, and no ordinary issuer name is taken for one."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from service.domain.issuers import RESERVED_ISSUER_PREFIX, is_reserved_issuer

_printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30)
_not_ascii = st.characters(min_codepoint=0x80, blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs"))


@given(rest=_printable, upper=st.lists(st.booleans(), min_size=12, max_size=12))
def test_a_name_under_the_prefix_in_any_case_is_reserved(rest: str, upper: list[bool]) -> None:
    prefix = "".join(c.upper() if up else c for c, up in zip(RESERVED_ISSUER_PREFIX, upper, strict=True))
    assert is_reserved_issuer(prefix + rest)
    assert is_reserved_issuer(f"  {prefix}{rest}")


@given(at=st.integers(0, len(RESERVED_ISSUER_PREFIX) - 1), stand_in=_not_ascii, rest=_printable)
def test_any_non_ascii_character_in_place_of_one_of_the_prefixs_is_reserved(at: int, stand_in: str, rest: str) -> None:
    name = RESERVED_ISSUER_PREFIX[:at] + stand_in + RESERVED_ISSUER_PREFIX[at + 1 :] + rest
    # Unless folding makes it ASCII of another letter (a full-width `x` is an `x`) or more than one character
    # (the `İ` folds to `i` and a dot): those are not look-alikes of the letter in that place.
    folded = unicodedata.normalize("NFKC", stand_in).casefold()
    assume(len(folded) == 1 and (not folded.isascii() or folded == RESERVED_ISSUER_PREFIX[at]))
    assert is_reserved_issuer(name)


@pytest.mark.parametrize(
    "name",
    [
        "urn:bedside\uff1adev-issuer",  # full-width colon
        "\uff35\uff32\uff2e:BEDSIDE:webhook",  # full-width capitals
        "urn:b\u0435dside:dev-issuer",  # Cyrillic ie
        "urn\ua789bedside\ua789x",  # modifier letter colon
        "urn:be\u0301dside:x",  # an accent over the e, composed or not
    ],
)
def test_names_that_read_as_the_services_own_are_reserved(name: str) -> None:
    assert is_reserved_issuer(name)


@pytest.mark.parametrize(
    "name",
    [
        "https://portal.acme.test",
        "urn:bedsid:x",  # one letter short
        "urn:bedsides:x",
        "urn:bedside",  # not in the namespace: no colon after it
        "urn:example:bedside:x",
        "https://bedside.example/urn:bedside:x",
        "portal-\u00e9",  # non-ASCII where no prefix is
    ],
)
def test_ordinary_names_are_not_reserved(name: str) -> None:
    assert not is_reserved_issuer(name)
