"""Role lists, as the operator writes them (`--roles`, `BEDSIDE_ADMIN_ISSUER_ROLES`): a set of the six role
names, or a refusal that names the roles there are and never echoes the text."""

from __future__ import annotations

import os
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.issuers import RoleName
from service.domain.principal import Role, parse_roles, role_names
from service.settings import SettingsError, load_settings

NAMES = [role.value for role in Role]
_spaces = st.text(alphabet=" \t", max_size=2)


@given(
    chosen=st.lists(st.sampled_from(NAMES), min_size=1, max_size=12),
    pads=st.lists(st.tuples(_spaces, _spaces), min_size=12, max_size=12),
)
def test_any_list_of_role_names_parses_to_its_set(chosen: list[str], pads: list[tuple[str, str]]) -> None:
    text = ",".join(f"{before}{name}{after}" for name, (before, after) in zip(chosen, pads, strict=False))
    assert parse_roles(text) == {Role(name) for name in chosen}


@given(st.text(alphabet=" \t", max_size=4))
def test_a_blank_list_is_no_role(text: str) -> None:
    assert parse_roles(text) == frozenset()


@given(
    chosen=st.lists(st.sampled_from(NAMES), max_size=5),
    stranger=st.text(max_size=20).filter(lambda s: s.strip() not in NAMES and "," not in s),
    at=st.integers(min_value=0, max_value=5),
)
def test_a_list_with_anything_but_a_role_name_is_refused_without_quoting_it(
    chosen: list[str], stranger: str, at: int
) -> None:
    items = [*chosen[:at], stranger, *chosen[at:]]
    text = ",".join(items)
    if not text.strip():
        return  # a blank text is the empty set (above)
    with pytest.raises(ValueError, match=r"^roles are role names") as raised:
        parse_roles(text)
    assert str(raised.value) == (  # fixed text: never the value, which may come from a setting
        "roles are role names separated by commas, each one of patient, proxy, physician, staff, compliance, admin"
    )


@given(st.sets(st.sampled_from(list(Role))))
def test_role_names_come_in_one_order_whatever_the_set(roles: set[Role]) -> None:
    names = role_names(roles)
    assert list(names) == [name for name in NAMES if Role(name) in roles]
    assert parse_roles(",".join(names)) == roles


def test_the_api_schema_knows_exactly_the_domains_roles() -> None:
    assert list(get_args(RoleName)) == NAMES


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BEDSIDE_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("value", "roles"),
    [
        (None, frozenset()),  # unset: admins register no new issuers
        ("patient,proxy", {Role.PATIENT, Role.PROXY}),
        (" staff , physician ", {Role.STAFF, Role.PHYSICIAN}),
        ("", frozenset()),  # admins register no new issuers
    ],
    ids=["unset", "two", "spaces", "empty"],
)
def test_the_admin_issuer_roles_setting(monkeypatch: pytest.MonkeyPatch, value: str | None, roles: set[Role]) -> None:
    if value is not None:
        monkeypatch.setenv("BEDSIDE_ADMIN_ISSUER_ROLES", value)
    assert load_settings().admin_issuer_roles == roles


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize("value", ["doctor-secret-x", "patient,,proxy", '["patient"]'])
def test_a_bad_admin_issuer_roles_setting_is_named_without_its_value(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("BEDSIDE_ADMIN_ISSUER_ROLES", value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "BEDSIDE_ADMIN_ISSUER_ROLES" in str(raised.value)
    assert value not in str(raised.value)
