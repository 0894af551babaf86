"""The local key file KEK provider: Bedside's embedded default.

The file is JSON, readable by its owner only (mode 0600), and holds one KEK identity in several
AES-256 versions:

    {"format": "bedside-kek-file", "format_version": 1, "kek_id": "file:<uuid>", "primary_version": 2,
     "versions": [{"version": 1, "state": "retired"},
                  {"version": 2, "state": "active", "key": "<base64 of 32 bytes>"}]}

A wrap is `nonce(12) || AES-256-GCM(kek, nonce, dek_secret, aad)`, with the AAD binding the KEK id and
version to the caller's AAD (see `crypto.kek.dek_wrap_aad`).

Safety:
- created with `O_CREAT | O_EXCL` and mode 0600, written to a temporary file that `os.replace` moves
  into place, so a reader sees the old file or the new one, never half of one;
- a file that its group or other users can access is refused, with the path and the fix in the message;
  so is one the OS will not open or read (a permission, a symlink loop, an I/O error), with the path and
  the OS's reason, as a `KeyProviderError` like every other refusal;
- changes (first creation, `add_version`, `retire_version`) hold an exclusive `flock` on `<file>.lock`
  and re-read the file under it, so a `bedside keys` command and a running service do not lose each
  other's updates; each call notices a file changed by another process and reloads it;
- a missing file is created only when the provider is constructed with `create=True`, never later:
  silently replacing a lost key file would orphan every stored DEK.

One instance is not thread-safe; give each thread its own or serialize calls.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.errors import DecryptionError, KekVersionUnavailableError, KeyProviderError
from crypto.kek import WrappedKey, check_dek_secret, kek_gcm_aad

if TYPE_CHECKING:
    from crypto.kek import KekProvider

__all__ = ["LocalKeyFileProvider"]

_FORMAT = "bedside-kek-file"
_FORMAT_VERSION = 1
_KEK_BYTES = 32
_NONCE_BYTES = 12
_WRAPPED_BYTES = _NONCE_BYTES + 32 + 16
_MAX_VERSION = 2**32 - 1

_Signature = tuple[int, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class _State:
    kek_id: str
    primary: int
    active: Mapping[int, bytes] = field(repr=False)
    retired: frozenset[int]


class LocalKeyFileProvider:
    """KEK provider backed by a 0600 JSON key file; see the module docstring for the format and rules."""

    __slots__ = ("_path", "_signature", "_state")

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        """Load the key file at `path`, or create it with one fresh KEK version if `create` allows.

        Raises `KeyProviderError` if the file is missing (and `create` is false), unreadable, unsafe or
        malformed.
        """
        self._path = Path(path)
        try:
            self._state, self._signature = _read(self._path)
        except FileNotFoundError:
            if not create:
                raise KeyProviderError(
                    f"KEK file {self._path} does not exist; restore it from backup, or create a new one "
                    "only if no data was ever encrypted with it"
                ) from None
            try:
                self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise _unreadable("create the directory of", self._path, exc) from None
            with _locked(self._path):
                try:
                    self._state, self._signature = _read(self._path)  # another process won the race
                except FileNotFoundError:
                    state = _State(
                        kek_id=f"file:{uuid4()}",
                        primary=1,
                        active={1: os.urandom(_KEK_BYTES)},
                        retired=frozenset(),
                    )
                    self._signature = _write(self._path, state)
                    self._state = state

    def __repr__(self) -> str:
        return (
            f"LocalKeyFileProvider(path={str(self._path)!r}, kek_id={self._state.kek_id!r}, "
            f"primary_version={self._state.primary})"
        )

    @property
    def path(self) -> Path:
        """Where the key file lives."""
        return self._path

    @property
    def kek_id(self) -> str:
        """`file:<uuid>`, fixed when the file was created."""
        return self._current().kek_id

    @property
    def primary_version(self) -> int:
        """The version new wraps use (the newest)."""
        return self._current().primary

    def versions(self) -> tuple[int, ...]:
        """Versions that can still unwrap, ascending."""
        return tuple(sorted(self._current().active))

    def retired_versions(self) -> tuple[int, ...]:
        """Versions whose key material was destroyed, ascending."""
        return tuple(sorted(self._current().retired))

    def wrap(self, dek_secret: bytes, aad: bytes) -> WrappedKey:
        """Encrypt a 32-byte DEK secret under the primary KEK version, bound to `aad`."""
        check_dek_secret(dek_secret)
        state = self._current()
        version = state.primary
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(state.active[version]).encrypt(nonce, dek_secret, kek_gcm_aad(state.kek_id, version, aad))
        return WrappedKey(kek_id=state.kek_id, kek_version=version, wrapped=nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Return the DEK secret, or raise `DecryptionError` (tampered wrap, other AAD).

        Raises `KekVersionUnavailableError` for another KEK id or an unknown or retired version.
        """
        state = self._current()
        if wrapped.kek_id != state.kek_id:
            raise KekVersionUnavailableError(f"wrap names KEK {wrapped.kek_id!r}, this file holds {state.kek_id!r}")
        kek = state.active.get(wrapped.kek_version)
        if kek is None:
            what = "retired" if wrapped.kek_version in state.retired else "unknown"
            raise KekVersionUnavailableError(f"KEK {state.kek_id!r} version {wrapped.kek_version} is {what}")
        blob = wrapped.wrapped
        if not isinstance(blob, bytes) or len(blob) != _WRAPPED_BYTES:
            raise DecryptionError
        try:
            return AESGCM(kek).decrypt(
                blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], kek_gcm_aad(state.kek_id, wrapped.kek_version, aad)
            )
        except InvalidTag:
            raise DecryptionError from None

    def add_version(self) -> int:
        """Generate a new KEK version, make it primary, persist the file, and return the version."""
        with _locked(self._path):
            state = self._reload()
            version = max(state.active.keys() | state.retired) + 1
            if version > _MAX_VERSION:
                raise KeyProviderError("KEK version numbers are exhausted")
            new = _State(
                kek_id=state.kek_id,
                primary=version,
                active={**state.active, version: os.urandom(_KEK_BYTES)},
                retired=state.retired,
            )
            self._signature = _write(self._path, new)
            self._state = new
            return version

    def retire_version(self, version: int) -> None:
        """Destroy the key material of a non-primary version (idempotent). Irreversible.

        Rewrap every wrap under `version` first: afterwards they can never be unwrapped.
        """
        with _locked(self._path):
            state = self._reload()
            if version in state.retired:
                return
            if version not in state.active:
                raise KekVersionUnavailableError(f"KEK {state.kek_id!r} has no version {version}")
            if version == state.primary:
                raise KeyProviderError(
                    f"refusing to retire primary version {version} of KEK {state.kek_id!r}; add a version first"
                )
            new = _State(
                kek_id=state.kek_id,
                primary=state.primary,
                active={v: k for v, k in state.active.items() if v != version},
                retired=state.retired | {version},
            )
            self._signature = _write(self._path, new)
            self._state = new

    def _current(self) -> _State:
        """The file's state, reloaded if another process changed (or broke) the file since last read."""
        try:
            signature = _signature(os.stat(self._path))
        except FileNotFoundError:
            raise KeyProviderError(
                f"KEK file {self._path} has disappeared; restore it from backup (no stored DEK can be "
                "unwrapped without it)"
            ) from None
        except OSError as exc:
            raise _unreadable("read", self._path, exc) from None
        if signature != self._signature:
            self._reload()
        return self._state

    def _reload(self) -> _State:
        try:
            self._state, self._signature = _read(self._path)
        except FileNotFoundError:
            raise KeyProviderError(f"KEK file {self._path} has disappeared; restore it from backup") from None
        return self._state


if TYPE_CHECKING:

    def _conforms(provider: LocalKeyFileProvider) -> KekProvider:
        return provider


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `<path>.lock` (serializes writers across processes)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _unreadable("lock", path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise _unreadable("lock", path, exc) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _unreadable(doing: str, path: Path, exc: OSError) -> KeyProviderError:
    """The error for a key file the OS will not let us open, read, lock or write: the path and the OS's
    reason. Raised `from None`, as every error of this module: the OSError says nothing more."""
    return KeyProviderError(f"cannot {doing} KEK file {path}: {exc.strerror or type(exc).__name__}")


def _read(path: Path) -> tuple[_State, _Signature]:
    """Open, check the mode of, and parse the key file. FileNotFoundError passes through; any other OSError
    is a `KeyProviderError` naming the file and the reason."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _unreadable("open", path, exc) from None
    try:
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyProviderError(f"KEK file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise KeyProviderError(
                    f"refusing to use KEK file {path}: its mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                    f"other users access it; fix with `chmod 600 {path}` (and consider the key exposed if "
                    "others could read it)"
                )
            raw = handle.read()
    except OSError as exc:  # an I/O error of the disk or the file system under it
        raise _unreadable("read", path, exc) from None
    return _parse(raw, path), _signature(st)


def _parse(raw: bytes, path: Path) -> _State:
    # Never chain the original exceptions: a JSONDecodeError carries the whole document (the keys).
    def bad(reason: str) -> KeyProviderError:
        return KeyProviderError(f"KEK file {path} is malformed ({reason}); restore it from backup")

    try:
        doc: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("format_version") != _FORMAT_VERSION:
        raise bad(f"not a {_FORMAT} version {_FORMAT_VERSION} document")
    kek_id = doc.get("kek_id")
    primary = doc.get("primary_version")
    entries = doc.get("versions")
    if not isinstance(kek_id, str) or not kek_id:
        raise bad("kek_id")
    if not isinstance(entries, list):
        raise bad("versions")
    active: dict[int, bytes] = {}
    retired: set[int] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise bad("version entry")
        version = entry.get("version")
        if type(version) is not int or not 1 <= version <= _MAX_VERSION or version in active or version in retired:
            raise bad("version number")
        if entry.get("state") == "retired" and set(entry) == {"version", "state"}:
            retired.add(version)
        elif entry.get("state") == "active" and set(entry) == {"version", "state", "key"}:
            try:
                key = base64.b64decode(entry["key"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise bad(f"key of version {version}") from None
            if len(key) != _KEK_BYTES:
                raise bad(f"key of version {version}")
            active[version] = key
        else:
            raise bad(f"state of version {version}")
    if type(primary) is not int or primary not in active or primary != max(active.keys() | retired):
        raise bad("primary_version")
    return _State(kek_id=kek_id, primary=primary, active=active, retired=frozenset(retired))


def _serialize(state: _State) -> bytes:
    entries: list[dict[str, Any]] = []
    for version in sorted(state.active.keys() | state.retired):
        if version in state.active:
            encoded = base64.b64encode(state.active[version]).decode("ascii")
            entries.append({"version": version, "state": "active", "key": encoded})
        else:
            entries.append({"version": version, "state": "retired"})
    doc = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "kek_id": state.kek_id,
        "primary_version": state.primary,
        "versions": entries,
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def _write(path: Path, state: _State) -> _Signature:
    """Write a new 0600 temporary file next to `path`, fsync it, and atomically replace `path` with it.
    An OSError (a full or read-only file system) is a `KeyProviderError`, and the file is either the old
    one or the new one, never a mix: the old one when the error came before the rename; the new one when
    only making the rename durable (or the stat after it) failed. The caller's state is left as it was,
    and a later read reloads whichever file is there."""
    try:
        return _replace(path, state)
    except OSError as exc:
        raise _unreadable("write", path, exc) from None


def _replace(path: Path, state: _State) -> _Signature:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the umask
            handle.write(_serialize(state))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # make the rename durable
    finally:
        os.close(dir_fd)
    return _signature(os.stat(path))
