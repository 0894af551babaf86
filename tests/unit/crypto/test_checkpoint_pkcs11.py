"""The PKCS#11 checkpoint signer against a throwaway SoftHSM2 token.

SoftHSM2 is required, not optional: without it these tests fail with instructions (CI installs it).
PKCS#11 library state is per process: like test_kek_pkcs11.py, the module fixture points SOFTHSM2_CONF
at its own token directory, re-initializes the library and finalizes it when the module is done.
"""

from __future__ import annotations

import base64
import os
import pickle
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING
from uuid import uuid4

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crypto.checkpoint import (
    CheckpointError,
    CheckpointSigner,
    format_checkpoint,
    format_vkey,
    key_id,
    sign_note,
    verify_checkpoint,
)

if TYPE_CHECKING:
    # Imported at run time inside the fixtures, so a missing python-pkcs11 fails with instructions.
    from crypto.checkpoint_pkcs11 import Pkcs11CheckpointSigner

TOKEN_LABEL = "bedside-audit-test"
USER_PIN = "user-pin-5309"
SO_PIN = "so-pin-8642"
ROOT = bytes(range(32))

INSTALL_HINT = (
    "SoftHSM2 is required for the PKCS#11 tests: install it with `apt-get install -y softhsm2` "
    "(Debian/Ubuntu), `dnf install softhsm` (Fedora) or `brew install softhsm` (macOS), and install "
    "python-pkcs11 into the virtualenv (`pip install 'python-pkcs11>=0.10'`)."
)


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

    root = tmp_path_factory.mktemp("softhsm-audit")
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
def name() -> str:
    """Each test gets its own key name (and so its own key pair) on the shared token."""
    return f"audit.test/{uuid4().hex[:12]}"


def make_signer(
    softhsm: SoftHsm, name: str, *, create: bool = False, pin: str = USER_PIN, token_label: str = TOKEN_LABEL
) -> Pkcs11CheckpointSigner:
    from crypto.checkpoint_pkcs11 import Pkcs11CheckpointSigner

    return Pkcs11CheckpointSigner(
        library_path=softhsm.library, token_label=token_label, user_pin=pin, name=name, create=create
    )


def signature_of(note: str) -> tuple[bytes, bytes, bytes]:
    """(signed message, key id, signature) of a note with exactly one signature line."""
    text, _, block = note.rpartition("\n\n")
    line = block.removesuffix("\n")
    assert "\n" not in line
    _, _, b64 = line.rpartition(" ")
    blob = base64.b64decode(b64, validate=True)
    return (text + "\n").encode("utf-8"), blob[:4], blob[4:]


def test_the_key_pair_is_generated_on_first_use_and_found_again(softhsm: SoftHsm, name: str) -> None:
    with make_signer(softhsm, name, create=True) as first:
        assert isinstance(first, CheckpointSigner)
        assert first.name == name
        assert len(first.public_key) == 32
        assert first.key_id == key_id(name, first.public_key)
        public_key = first.public_key
    with make_signer(softhsm, name) as again:
        assert again.public_key == public_key
        assert again.key_id == key_id(name, public_key)
    with make_signer(softhsm, name, create=True) as created_again:  # create never replaces a key pair
        assert created_again.public_key == public_key


def test_a_checkpoint_signed_on_the_token_verifies(softhsm: SoftHsm, name: str) -> None:
    text = format_checkpoint(name, 7, ROOT, ["extension line"])
    with make_signer(softhsm, name, create=True) as signer:
        note = sign_note(text, signer)
        public_key = signer.public_key
        vkey = format_vkey(name, public_key)
        assert signer.verifier_key().to_vkey() == vkey
    checkpoint = verify_checkpoint(note, vkey)
    assert (checkpoint.origin, checkpoint.size, checkpoint.root_hash) == (name, 7, ROOT)

    # Independently of crypto.checkpoint: plain Ed25519 over the note text, final newline included.
    message, kid, signature = signature_of(note)
    assert message == text.encode("utf-8")
    assert kid == key_id(name, public_key)
    assert len(signature) == 64
    Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)  # raises if it does not verify

    with pytest.raises(CheckpointError):
        verify_checkpoint(note.replace("\n7\n", "\n8\n"), vkey)


def test_without_create_a_missing_key_pair_is_an_error_and_nothing_is_generated(softhsm: SoftHsm, name: str) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint key labelled"):
        make_signer(softhsm, name)
    with pytest.raises(CheckpointError, match="no checkpoint key labelled"):
        make_signer(softhsm, name)


def test_the_private_key_lives_on_the_token_and_cannot_be_extracted(softhsm: SoftHsm, name: str) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as p11err

    with make_signer(softhsm, name, create=True) as signer:
        public_key = signer.public_key

    token = softhsm.pkcs11.lib(softhsm.library).get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        label = f"bedside-audit:{name}"
        privates = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
        publics = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}))
        assert (len(privates), len(publics)) == (1, 1)
        private, public = privates[0], publics[0]
        assert private[Attribute.KEY_TYPE] == KeyType.EC_EDWARDS
        assert private[Attribute.TOKEN] is True
        assert private[Attribute.PRIVATE] is True
        assert private[Attribute.SIGN] is True
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.ALWAYS_SENSITIVE] is True  # generated sensitive, never imported
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.LOCAL] is True  # generated on the token
        assert private[Attribute.DECRYPT] is False
        assert private[Attribute.DERIVE] is False
        assert private[Attribute.ID] == label.encode()
        assert public[Attribute.TOKEN] is True
        assert public[Attribute.EC_PARAMS] in (b"\x13\x0cedwards25519", b"\x06\x03\x2b\x65\x70")
        assert public[Attribute.EC_POINT] in (public_key, b"\x04\x20" + public_key)
        # Reading the private scalar is refused by the token ...
        with pytest.raises(p11err.AttributeSensitive):
            private[Attribute.VALUE]
        # ... so is wrapping it out under another key ...
        exporter = session.generate_key(KeyType.AES, 256, label="exporter")
        with pytest.raises(p11err.KeyUnextractable):
            exporter.wrap_key(private)
        # ... and so is making it extractable or not sensitive after the fact.
        with pytest.raises(p11err.PKCS11Error):
            private[Attribute.EXTRACTABLE] = True
        with pytest.raises(p11err.PKCS11Error):
            private[Attribute.SENSITIVE] = False


def test_half_a_key_pair_is_refused_not_replaced(softhsm: SoftHsm, name: str) -> None:
    from pkcs11 import Attribute, ObjectClass

    make_signer(softhsm, name, create=True).close()
    token = softhsm.pkcs11.lib(softhsm.library).get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        label = f"bedside-audit:{name}"
        session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label).destroy()
        assert len(list(session.get_objects({Attribute.LABEL: label}))) == 1
    with pytest.raises(CheckpointError, match="only half"):
        make_signer(softhsm, name, create=True)


def test_a_public_key_that_is_not_the_private_keys_fails_the_self_test(softhsm: SoftHsm, name: str) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass

    make_signer(softhsm, name, create=True).close()
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    token = softhsm.pkcs11.lib(softhsm.library).get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        label = f"bedside-audit:{name}"
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
        ec_params = public[Attribute.EC_PARAMS]
        public.destroy()
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                Attribute.TOKEN: True,
                Attribute.LABEL: label,
                Attribute.EC_PARAMS: ec_params,
                Attribute.EC_POINT: b"\x04\x20" + stranger,
                Attribute.VERIFY: True,
            }
        )
    with pytest.raises(CheckpointError, match="self-test"):
        make_signer(softhsm, name)


def test_a_wrong_pin_or_token_fails_without_quoting_the_pin(softhsm: SoftHsm, name: str) -> None:
    with pytest.raises(CheckpointError, match="log in") as info:
        make_signer(softhsm, name, create=True, pin="wrong-pin-0000")
    assert "wrong-pin-0000" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True
    with pytest.raises(CheckpointError, match="no-such-token"):
        make_signer(softhsm, name, create=True, token_label="no-such-token")


def test_an_invalid_key_name_is_refused_before_the_token_is_touched(softhsm: SoftHsm) -> None:
    for bad in ("", "has space", "has+plus", "new\nline"):
        with pytest.raises(CheckpointError, match="invalid key name"):
            make_signer(softhsm, bad, create=True)


def test_the_signer_shows_no_pin_cannot_be_pickled_and_stops_signing_when_closed(softhsm: SoftHsm, name: str) -> None:
    signer = make_signer(softhsm, name, create=True)
    text = repr(signer)
    assert USER_PIN not in text
    assert TOKEN_LABEL in text
    assert signer.key_id.hex() in text
    with pytest.raises(TypeError):
        pickle.dumps(signer)
    with pytest.raises(CheckpointError):
        signer.sign(b"not bytes".decode())  # type: ignore[arg-type]
    signer.close()
    with pytest.raises(CheckpointError, match="signing"):
        signer.sign(b"after close\n")


def test_the_public_key_is_read_whether_or_not_the_token_wraps_it_in_an_octet_string() -> None:
    from crypto.checkpoint_pkcs11 import _raw_ed25519_point

    key = bytes(range(32))
    assert _raw_ed25519_point(b"\x04\x20" + key) == key  # PKCS#11 3.0, SoftHSM2
    assert _raw_ed25519_point(key) == key  # tokens that return the bare point
    for bad in (b"\x04\x21" + key + b"\x00", b"\x03\x20" + key, key[:31], b"\x04\x39" + bytes(57), None):
        with pytest.raises(CheckpointError):
            _raw_ed25519_point(bad)
