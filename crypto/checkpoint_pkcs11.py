"""A checkpoint signer whose Ed25519 key pair lives on a PKCS#11 token (python-pkcs11).

The key pair is generated ON the token, never outside it, as two token objects labelled
`bedside-audit:<name>` (`CKA_ID` is the label in UTF-8): a private key with `CKA_PRIVATE`,
`CKA_SENSITIVE` and `CKA_SIGN` true and `CKA_EXTRACTABLE`, `CKA_MODIFIABLE`, `CKA_COPYABLE`,
`CKA_DECRYPT`, `CKA_UNWRAP`, `CKA_DERIVE` false; and its public key, public and read-only. Key type
`CKK_EC_EDWARDS`; `CKA_EC_PARAMS` is the DER PrintableString "edwards25519" (the PKCS#11 3.0 form),
or the RFC 8410 OID 1.3.101.112 on tokens that only take that. Signatures are `CKM_EDDSA` without
parameters: pure Ed25519 (RFC 8032), exactly what the signed-note spec asks for.

Every failure (library, token, login, missing or malformed key pair, signing) raises
`crypto.checkpoint.CheckpointError`, the one error of the checkpoint signer contract; messages name the
token and key, never the PIN.

Besides `crypto.kek_pkcs11`, this is the only module in `crypto` that imports `pkcs11`. PKCS#11 login
state is per process and token: a second session of this process on a token that is already logged in
reuses that login without checking its own PIN, and closing a session that logged in logs out every
session of the process on that token. So `close()` the signer (or use it as a context manager) only
when done with the token, and prefer a token of its own over sharing the KEK provider's. Generating the
key pair (`create=True`) is an administrative act: run it from one process at a time.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11err
from pkcs11.types import Object, Session, SignMixin

from crypto.checkpoint import CheckpointError, VerifierKey, _is_valid_name, key_id

if TYPE_CHECKING:
    from crypto.checkpoint import CheckpointSigner

__all__ = ["LABEL_PREFIX", "Pkcs11CheckpointSigner"]

LABEL_PREFIX = "bedside-audit:"
"""Both objects of the key pair for key name `n` are labelled `LABEL_PREFIX + n`."""

_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64

# CKA_EC_PARAMS for Ed25519, in the order tried at generation: DER PrintableString "edwards25519"
# (PKCS#11 3.0) and DER OID 1.3.101.112 (RFC 8410; SoftHSM2 before 2.6 accepted only this one).
_ED25519_EC_PARAMS = (
    b"\x13\x0cedwards25519",
    b"\x06\x03\x2b\x65\x70",
)

# Signed after finding the key pair, to prove the public key belongs to the private key. It contains
# a NUL and no final newline, so it can never be a signed-note text: the signature it yields cannot be
# replayed as a note signed by the log.
_SELF_TEST_MESSAGE = b"\x00bedside-audit PKCS#11 key pair self-test"


def _raw_ed25519_point(ec_point: object) -> bytes:
    """The 32-byte public key from `CKA_EC_POINT`.

    PKCS#11 3.0 (and SoftHSM2) wrap it in a DER OCTET STRING (`04 20 || key`); some tokens return the
    raw 32 bytes. The two are told apart by length alone; anything else is refused.
    """
    if not isinstance(ec_point, bytes):
        raise CheckpointError("PKCS#11 public key has no CKA_EC_POINT bytes")
    if len(ec_point) == 2 + _ED25519_KEY_SIZE and ec_point[:2] == bytes([0x04, _ED25519_KEY_SIZE]):
        return ec_point[2:]
    if len(ec_point) == _ED25519_KEY_SIZE:
        return ec_point
    raise CheckpointError("PKCS#11 public key is not a 32-byte Ed25519 point")


class Pkcs11CheckpointSigner:
    """A `CheckpointSigner` whose Ed25519 private key is a sensitive, non-extractable token object."""

    __slots__ = ("_key_id", "_name", "_private_key", "_public_key", "_session", "_token_label")

    def __init__(self, *, library_path: str, token_label: str, user_pin: str, name: str, create: bool = False) -> None:
        """Log in to the token labelled `token_label` and find the key pair for `name` on it.

        When there is none, generate it if `create` is true. Raises `CheckpointError` (naming the
        library, token or key, never the PIN) for an invalid name, an unusable library or token, a
        failed login, a missing key pair without `create`, or a key pair that is incomplete, duplicated,
        not Ed25519, or whose halves do not match.
        """
        if not _is_valid_name(name):
            raise CheckpointError("invalid key name")
        self._name = name
        self._token_label = token_label
        try:
            token = pkcs11.lib(library_path).get_token(token_label=token_label)
        except (p11err.PKCS11Error, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot use PKCS#11 token {token_label!r} via {library_path}: {type(exc).__name__}"
            ) from None
        try:
            self._session: Session = token.open(rw=True, user_pin=user_pin)
        except p11err.UserAlreadyLoggedIn:
            # Login state is per process: another session of ours already logged in.
            self._session = token.open(rw=True)
        except p11err.PKCS11Error as exc:
            raise CheckpointError(f"cannot log in to PKCS#11 token {token_label!r}: {type(exc).__name__}") from None
        try:
            found = self._find()
            if found is None:
                if not create:
                    raise CheckpointError(
                        f"PKCS#11 token {token_label!r} holds no checkpoint key labelled {self._label!r}; "
                        "restore it, or create one for a new log"
                    )
                found = self._generate()
            public_object, private_object = found
            self._public_key = _raw_ed25519_point(self._read(public_object, Attribute.EC_POINT))
            if not isinstance(private_object, SignMixin):
                raise CheckpointError(f"PKCS#11 key {self._label!r} cannot sign")
            self._private_key: SignMixin = private_object
            self._key_id = key_id(name, self._public_key)
            self._self_test()
        except BaseException:
            self._session.close()
            raise

    def __repr__(self) -> str:
        return (
            f"Pkcs11CheckpointSigner(token_label={self._token_label!r}, name={self._name!r}, "
            f"key_id={self._key_id.hex()!r}, key=<on token>)"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("checkpoint signers cannot be pickled")

    def __enter__(self) -> Pkcs11CheckpointSigner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the session (logging out if it is the one that logged in); `sign` fails afterwards."""
        self._session.close()

    @property
    def name(self) -> str:
        """The key name."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id, `crypto.checkpoint.key_id(name, public_key)`."""
        return self._key_id

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key, as read from the token."""
        return self._public_key

    def verifier_key(self) -> VerifierKey:
        """Return the matching verifier key."""
        return VerifierKey(self._name, self._key_id, self._public_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature over `message`, computed on the token (`CKM_EDDSA`)."""
        if not isinstance(message, bytes):
            raise CheckpointError("message must be bytes")
        try:
            signature = self._private_key.sign(message, mechanism=Mechanism.EDDSA)
        except p11err.PKCS11Error as exc:
            raise CheckpointError(f"PKCS#11 signing with {self._label!r} failed: {type(exc).__name__}") from None
        if not isinstance(signature, bytes) or len(signature) != _ED25519_SIG_SIZE:
            raise CheckpointError("PKCS#11 token returned a malformed Ed25519 signature")
        return signature

    @property
    def _label(self) -> str:
        return LABEL_PREFIX + self._name

    def _find(self) -> tuple[Object, Object] | None:
        """The (public, private) key objects labelled for this name, or `None` if there are neither."""
        halves: list[Object] = []
        for object_class in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY):
            query = {Attribute.CLASS: object_class, Attribute.LABEL: self._label}
            try:
                objects = list(self._session.get_objects(query))
            except p11err.PKCS11Error as exc:
                raise CheckpointError(f"PKCS#11 object search failed: {type(exc).__name__}") from None
            if len(objects) > 1:
                raise CheckpointError(
                    f"PKCS#11 token holds {len(objects)} {object_class.name} objects labelled {self._label!r}"
                )
            halves.extend(objects)
        if not halves:
            return None
        if len(halves) != 2:
            raise CheckpointError(f"PKCS#11 token holds only half of the key pair labelled {self._label!r}")
        public_object, private_object = halves
        for obj in halves:
            if self._read(obj, Attribute.KEY_TYPE) != KeyType.EC_EDWARDS:
                raise CheckpointError(f"PKCS#11 key {self._label!r} is not an EC_EDWARDS key")
        return public_object, private_object

    def _generate(self) -> tuple[Object, Object]:
        label = self._label
        last: p11err.PKCS11Error | None = None
        for ec_params in _ED25519_EC_PARAMS:
            try:
                return self._session.generate_keypair(
                    KeyType.EC_EDWARDS,
                    id=label.encode("utf-8"),
                    label=label,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                    public_template={
                        Attribute.EC_PARAMS: ec_params,
                        Attribute.PRIVATE: False,
                        Attribute.MODIFIABLE: False,
                        Attribute.ENCRYPT: False,
                        Attribute.WRAP: False,
                    },
                    private_template={
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.MODIFIABLE: False,
                        Attribute.COPYABLE: False,
                        Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
            except p11err.PKCS11Error as exc:
                last = exc  # tokens disagree on the form of the curve parameters: try the other one
        raise CheckpointError(
            f"PKCS#11 token {self._token_label!r} could not generate an Ed25519 key pair: {type(last).__name__}"
        )

    def _read(self, obj: Object, attribute: Attribute) -> object:
        try:
            return obj[attribute]
        except p11err.PKCS11Error as exc:
            raise CheckpointError(
                f"cannot read {attribute.name} of PKCS#11 key {self._label!r}: {type(exc).__name__}"
            ) from None

    def _self_test(self) -> None:
        """Sign on the token and verify here: the public key read is the private key's."""
        try:
            public = Ed25519PublicKey.from_public_bytes(self._public_key)
            public.verify(self.sign(_SELF_TEST_MESSAGE), _SELF_TEST_MESSAGE)
        except (ValueError, InvalidSignature):
            raise CheckpointError(
                f"PKCS#11 key pair {self._label!r} fails its self-test: the public key is not the private key's"
            ) from None


if TYPE_CHECKING:

    def _conforms(signer: Pkcs11CheckpointSigner) -> CheckpointSigner:
        return signer
