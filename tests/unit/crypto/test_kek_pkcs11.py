"""The PKCS#11 KEK provider against a throwaway SoftHSM2 token.

SoftHSM2 is required, not optional: without it these tests fail with instructions (CI installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from uuid import uuid4

import pytest

from crypto.errors import DecryptionError, KekVersionUnavailableError, KeyProviderError
from crypto.kek import WrappedKey, dek_wrap_aad
from crypto.keys import DataKey

if TYPE_CHECKING:
    # Imported at run time inside the fixtures, so a missing python-pkcs11 fails with instructions.
    from crypto.kek_pkcs11 import Pkcs11KekProvider

TOKEN_LABEL = "bedside-test"
USER_PIN = "user-pin-4821"
SO_PIN = "so-pin-9173"
DEK = DataKey.generate()

INSTALL_HINT = (
    "SoftHSM2 is required for the PKCS#11 tests: install it with `apt-get install -y softhsm2` "
    "(Debian/Ubuntu), `dnf install softhsm` (Fedora) or `brew install softhsm` (macOS), and install "
    "python-pkcs11 into the virtualenv (`pip install 'python-pkcs11>=0.10'`)."
)


def aad_for(patient: str) -> bytes:
    return dek_wrap_aad(dek_id=DEK.id, dek_version=DEK.version, tenant="st-elsewhere", patient=patient)


@dataclass(frozen=True)
class SoftHsm:
    library: str
    pkcs11: ModuleType


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A SoftHSM2 configuration whose token directory is a fresh temporary directory, with one token."""
    try:
        import pkcs11

        from crypto.kek_pkcs11 import find_softhsm2_library
    except ImportError as exc:
        pytest.fail(f"python-pkcs11 is not importable ({exc}). {INSTALL_HINT}")
    library = find_softhsm2_library()
    util = shutil.which("softhsm2-util")
    if library is None or util is None:
        pytest.fail(f"SoftHSM2 not found (library: {library}, softhsm2-util: {util}). {INSTALL_HINT}")

    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        subprocess.run(
            [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin", SO_PIN, "--pin", USER_PIN],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        )
        # SoftHSM2 reads SOFTHSM2_CONF in C_Initialize: start afresh in case this process loaded it before.
        lib = pkcs11.lib(library)
        lib.reinitialize()
        yield SoftHsm(library=library, pkcs11=pkcs11)
        lib.finalize()


@pytest.fixture
def kek_id() -> str:
    """Each test gets its own KEK identity on the shared token."""
    return f"test-{uuid4().hex[:12]}"


def make_provider(
    softhsm: SoftHsm, kek_id: str, *, pin: str = USER_PIN, token_label: str = TOKEN_LABEL
) -> Pkcs11KekProvider:
    from crypto.kek_pkcs11 import Pkcs11KekProvider

    return Pkcs11KekProvider(library_path=softhsm.library, token_label=token_label, user_pin=pin, kek_id=kek_id)


@pytest.fixture
def provider(softhsm: SoftHsm, kek_id: str) -> Iterator[Pkcs11KekProvider]:
    with make_provider(softhsm, kek_id) as p:
        yield p


def test_the_library_is_found_where_the_distribution_put_it(softhsm: SoftHsm) -> None:
    assert Path(softhsm.library).is_file()
    assert Path(softhsm.library).name == "libsofthsm2.so"


def test_wrap_and_unwrap_round_trip_on_the_token(provider: Pkcs11KekProvider, kek_id: str) -> None:
    assert provider.versions() == (1,)
    assert provider.primary_version == 1
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/A"))
    assert (wrapped.kek_id, wrapped.kek_version) == (kek_id, 1)
    assert len(wrapped.wrapped) == 12 + 32 + 16
    assert DEK.secret not in wrapped.wrapped
    assert provider.unwrap(wrapped, aad_for("Patient/A")) == DEK.secret


def test_a_wrap_is_bound_to_its_aad_and_bytes(provider: Pkcs11KekProvider) -> None:
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/A"))
    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, aad_for("Patient/B"))
    blob = bytearray(wrapped.wrapped)
    blob[20] ^= 1
    with pytest.raises(DecryptionError):
        provider.unwrap(WrappedKey(wrapped.kek_id, 1, bytes(blob)), aad_for("Patient/A"))
    with pytest.raises(DecryptionError):
        provider.unwrap(WrappedKey(wrapped.kek_id, 1, wrapped.wrapped[:-1]), aad_for("Patient/A"))
    with pytest.raises(KekVersionUnavailableError):
        provider.unwrap(WrappedKey("another-kek", 1, wrapped.wrapped), aad_for("Patient/A"))


def test_the_kek_lives_on_the_token_and_cannot_be_extracted(softhsm: SoftHsm, kek_id: str) -> None:
    p11 = softhsm.pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as p11err

    provider = make_provider(softhsm, kek_id)
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/A"))
    provider.close()

    token = p11.lib(softhsm.library).get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: kek_id.encode()}))
        assert len(keys) == 1
        kek = keys[0]
        assert kek[Attribute.LABEL] == f"bedside-kek:{kek_id}:1"
        assert kek[Attribute.KEY_TYPE] == KeyType.AES
        assert kek[Attribute.VALUE_LEN] == 32
        assert kek[Attribute.TOKEN] is True
        assert kek[Attribute.SENSITIVE] is True
        assert kek[Attribute.EXTRACTABLE] is False
        assert kek[Attribute.ALWAYS_SENSITIVE] is True  # generated sensitive, never imported
        assert kek[Attribute.NEVER_EXTRACTABLE] is True
        assert kek[Attribute.LOCAL] is True  # generated on the token
        assert kek[Attribute.WRAP] is False
        # Reading the key value is refused by the token ...
        with pytest.raises(p11err.AttributeSensitive):
            kek[Attribute.VALUE]
        # ... so is wrapping it out under another key ...
        exporter = session.generate_key(KeyType.AES, 256, label="exporter")
        with pytest.raises(p11err.KeyUnextractable):
            exporter.wrap_key(kek)
        # ... and so is making it extractable or not sensitive after the fact.
        with pytest.raises(p11err.PKCS11Error):
            kek[Attribute.EXTRACTABLE] = True
        with pytest.raises(p11err.PKCS11Error):
            kek[Attribute.SENSITIVE] = False

    with make_provider(softhsm, kek_id) as reopened:
        assert reopened.versions() == (1,)
        assert reopened.unwrap(wrapped, aad_for("Patient/A")) == DEK.secret


def test_rotation_adds_a_version_on_the_token_and_retirement_destroys_it(provider: Pkcs11KekProvider) -> None:
    old = provider.wrap(DEK.secret, aad_for("Patient/A"))
    assert provider.add_version() == 2
    assert provider.primary_version == 2
    assert provider.versions() == (1, 2)
    new = provider.wrap(DEK.secret, aad_for("Patient/A"))
    assert new.kek_version == 2
    assert provider.unwrap(old, aad_for("Patient/A")) == DEK.secret
    with pytest.raises(DecryptionError):
        provider.unwrap(WrappedKey(old.kek_id, 2, old.wrapped), aad_for("Patient/A"))
    with pytest.raises(KeyProviderError, match="primary"):
        provider.retire_version(2)
    provider.retire_version(1)
    provider.retire_version(1)  # idempotent
    assert provider.versions() == (2,)
    with pytest.raises(KekVersionUnavailableError):
        provider.unwrap(old, aad_for("Patient/A"))
    assert provider.unwrap(new, aad_for("Patient/A")) == DEK.secret
    with pytest.raises(KekVersionUnavailableError):
        provider.retire_version(9)


def test_a_wrong_pin_or_token_is_a_provider_error_that_does_not_quote_the_pin(softhsm: SoftHsm, kek_id: str) -> None:
    with pytest.raises(KeyProviderError, match="log in") as info:
        make_provider(softhsm, kek_id, pin="wrong-pin-0000")
    assert "wrong-pin-0000" not in str(info.value)
    with pytest.raises(KeyProviderError, match="no-such-token"):
        make_provider(softhsm, kek_id, token_label="no-such-token")


def test_the_provider_repr_shows_neither_pin_nor_keys(provider: Pkcs11KekProvider) -> None:
    text = repr(provider)
    assert USER_PIN not in text
    assert TOKEN_LABEL in text
