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


@pytest.mark.parametrize(
    "name",
    [
        "urn:\u3164bedside:dev-issuer",  # HANGUL FILLER (Lo): printable, and blank on screen
        "\u115furn:bedside:dev-issuer",  # HANGUL CHOSEONG FILLER (Lo): nothing on screen, strip() keeps it
        "urn:bed\u034fside:dev-issuer",  # COMBINING GRAPHEME JOINER (Mn): no glyph of its own
        "urn:bed\u17b4side:dev-issuer",  # KHMER VOWEL INHERENT AQ (Mn): no glyph of its own
    ],
)
def test_invisible_characters_in_or_before_the_prefix_do_not_make_it_ordinary(name: str) -> None:
    """A reader of the audit log or `bedside issuer list` sees nothing of these characters (each printable,
    so `is_plain_text` lets the name in), so the names read as the service's own; yet each takes a place of
    the prefix (as a non-ASCII stand-in) and shifts the letters after it out of theirs."""
    assert is_reserved_issuer(name)


def test_a_dotted_capital_i_in_place_of_the_i_is_reserved() -> None:
    """`URN:BEDSİDE:` reads as the service's namespace in capitals; the `İ` folds to two characters (`i` and a
    combining dot), which shifts the letters after it out of their places."""
    assert is_reserved_issuer("URN:BEDS\u0130DE:dev-issuer")


@pytest.mark.parametrize(
    "name",
    [
        "\u533b\u7642\u60c5\u5831\u9023\u643a\u30dd\u30fc\u30bf\u30eb\u682a\u5f0f\u4f1a\u793e",  # Japanese
        "\u0431\u043e\u043b\u044c\u043d\u0438\u0447\u043d\u044b\u0439\u043f\u043e\u0440\u0442\u0430\u043b",  # Cyrillic
    ],
)
def test_a_name_with_no_letter_of_the_prefix_is_not_reserved(name: str) -> None:
    """Names in another script, which share not one letter with `urn:bedside:`, do not read as it."""
    assert not is_reserved_issuer(name)
