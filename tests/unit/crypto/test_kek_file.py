"""The local key file KEK provider: 0600 on creation, unsafe files refused, rotation and retirement,
wraps bound to their AAD, and no key bytes in any text."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from crypto.errors import DecryptionError, KekVersionUnavailableError, KeyProviderError
from crypto.kek import WrappedKey, dek_wrap_aad
from crypto.kek_file import LocalKeyFileProvider
from crypto.keys import DataKey

DEK = DataKey.generate()


def aad_for(patient: str, *, dek: DataKey = DEK, tenant: str = "st-elsewhere") -> bytes:
    return dek_wrap_aad(dek_id=dek.id, dek_version=dek.version, tenant=tenant, patient=patient)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "kek.json"


@pytest.fixture
def provider(key_path: Path) -> LocalKeyFileProvider:
    return LocalKeyFileProvider(key_path)


def file_keys(path: Path) -> list[bytes]:
    doc = json.loads(path.read_text())
    return [base64.b64decode(v["key"]) for v in doc["versions"] if "key" in v]


def test_the_file_is_created_on_first_use_with_mode_0600(provider: LocalKeyFileProvider, key_path: Path) -> None:
    mode = stat.S_IMODE(key_path.stat().st_mode)
    assert mode == 0o600
    assert provider.versions() == (1,)
    assert provider.primary_version == 1
    assert provider.kek_id.startswith("file:")
    assert UUID(provider.kek_id.removeprefix("file:"))
    # no temporary files left behind
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["kek.json", "kek.json.lock"]


def test_the_file_is_0600_whatever_the_umask(key_path: Path) -> None:
    old = os.umask(0o000)
    try:
        LocalKeyFileProvider(key_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_wrap_then_unwrap_round_trips_and_a_reload_reads_the_same_keys(
    provider: LocalKeyFileProvider, key_path: Path
) -> None:
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/1"))
    assert (wrapped.kek_id, wrapped.kek_version) == (provider.kek_id, 1)
    assert len(wrapped.wrapped) == 12 + 32 + 16
    assert provider.unwrap(wrapped, aad_for("Patient/1")) == DEK.secret
    again = LocalKeyFileProvider(key_path, create=False)
    assert again.kek_id == provider.kek_id
    assert again.unwrap(wrapped, aad_for("Patient/1")) == DEK.secret


def test_a_wrap_for_one_patient_does_not_unwrap_for_another(provider: LocalKeyFileProvider) -> None:
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/A"))
    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, aad_for("Patient/B"))
    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, aad_for("Patient/A", tenant="mercy"))
    other_dek = DataKey(DEK.id, DEK.version + 1, DEK.secret)
    with pytest.raises(DecryptionError):
        provider.unwrap(wrapped, aad_for("Patient/A", dek=other_dek))


def test_a_tampered_wrap_does_not_unwrap(provider: LocalKeyFileProvider) -> None:
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/A"))
    for i in range(len(wrapped.wrapped)):
        blob = bytearray(wrapped.wrapped)
        blob[i] ^= 0x01
        with pytest.raises(DecryptionError):
            provider.unwrap(WrappedKey(wrapped.kek_id, wrapped.kek_version, bytes(blob)), aad_for("Patient/A"))
    with pytest.raises(DecryptionError):
        provider.unwrap(WrappedKey(wrapped.kek_id, 1, wrapped.wrapped[:-1]), aad_for("Patient/A"))


def test_rotation_adds_a_primary_version_and_old_wraps_still_unwrap(
    provider: LocalKeyFileProvider, key_path: Path
) -> None:
    old = provider.wrap(DEK.secret, aad_for("Patient/A"))
    assert provider.add_version() == 2
    assert provider.primary_version == 2
    assert provider.versions() == (1, 2)
    new = provider.wrap(DEK.secret, aad_for("Patient/A"))
    assert new.kek_version == 2
    assert provider.unwrap(old, aad_for("Patient/A")) == DEK.secret
    assert provider.unwrap(new, aad_for("Patient/A")) == DEK.secret
    # a wrap cannot be relabelled as another version
    with pytest.raises(DecryptionError):
        provider.unwrap(WrappedKey(old.kek_id, 2, old.wrapped), aad_for("Patient/A"))
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_a_retired_version_can_no_longer_unwrap_and_its_key_is_gone(
    provider: LocalKeyFileProvider, key_path: Path
) -> None:
    old = provider.wrap(DEK.secret, aad_for("Patient/A"))
    old_key = file_keys(key_path)[0]
    provider.add_version()
    rewrapped = provider.wrap(provider.unwrap(old, aad_for("Patient/A")), aad_for("Patient/A"))
    provider.retire_version(1)
    assert provider.versions() == (2,)
    assert provider.retired_versions() == (1,)
    with pytest.raises(KekVersionUnavailableError, match="version 1 is retired"):
        provider.unwrap(old, aad_for("Patient/A"))
    assert provider.unwrap(rewrapped, aad_for("Patient/A")) == DEK.secret
    assert old_key not in file_keys(key_path)
    assert base64.b64encode(old_key) not in key_path.read_bytes()
    provider.retire_version(1)  # idempotent
    # numbers are never reused
    assert provider.add_version() == 3


def test_the_primary_version_cannot_be_retired(provider: LocalKeyFileProvider) -> None:
    with pytest.raises(KeyProviderError, match="primary"):
        provider.retire_version(1)
    with pytest.raises(KekVersionUnavailableError):
        provider.retire_version(7)


def test_unknown_kek_or_version_is_reported_as_unavailable(provider: LocalKeyFileProvider) -> None:
    wrapped = provider.wrap(DEK.secret, b"aad")
    with pytest.raises(KekVersionUnavailableError):
        provider.unwrap(WrappedKey("file:" + str(uuid4()), 1, wrapped.wrapped), b"aad")
    with pytest.raises(KekVersionUnavailableError, match="unknown"):
        provider.unwrap(WrappedKey(wrapped.kek_id, 9, wrapped.wrapped), b"aad")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o620, 0o700 | 0o004])
def test_a_file_others_can_access_is_refused_with_the_path_and_the_fix(
    provider: LocalKeyFileProvider, key_path: Path, mode: int
) -> None:
    keys = file_keys(key_path)
    key_path.chmod(mode)
    with pytest.raises(KeyProviderError) as info:
        LocalKeyFileProvider(key_path)
    message = str(info.value)
    assert str(key_path) in message
    assert f"chmod 600 {key_path}" in message
    for key in keys:
        assert key.hex() not in message
        assert base64.b64encode(key).decode() not in message
    # a provider already running notices too
    with pytest.raises(KeyProviderError, match="chmod 600"):
        provider.wrap(DEK.secret, b"aad")


def test_another_processes_rotation_is_seen(provider: LocalKeyFileProvider, key_path: Path) -> None:
    other = LocalKeyFileProvider(key_path, create=False)
    assert other.add_version() == 2
    assert provider.primary_version == 2
    assert provider.wrap(DEK.secret, b"aad").kek_version == 2
    assert provider.add_version() == 3  # re-read under the lock: no lost update
    assert other.versions() == (1, 2, 3)


def test_a_missing_file_is_not_recreated_behind_the_callers_back(
    provider: LocalKeyFileProvider, key_path: Path
) -> None:
    with pytest.raises(KeyProviderError, match="does not exist"):
        LocalKeyFileProvider(key_path.with_name("absent.json"), create=False)
    key_path.unlink()
    with pytest.raises(KeyProviderError, match="disappeared"):
        provider.wrap(DEK.secret, b"aad")
    assert not key_path.exists()


def _in_a_loop(path: Path) -> str:
    path.unlink()
    path.symlink_to(path.name)  # resolves to itself
    return "Too many levels of symbolic links"


def _under_a_file(path: Path) -> str:
    path.parent.rename(path.parent.with_name("elsewhere"))
    path.parent.write_bytes(b"")  # the directory's name now names a regular file
    return "Not a directory"


def _failing_reads(path: Path) -> str:
    path.unlink()
    path.symlink_to("/proc/self/mem")  # a regular 0600 file that opens, whose first bytes do not read
    return "Input/output error"


# A key file the OS will not read, in ways that hold as root too (root reads a file of mode 000).
UNREADABLE = {"symlink-loop": _in_a_loop, "path-through-a-file": _under_a_file, "read-fails": _failing_reads}


@pytest.mark.parametrize("how", UNREADABLE)
def test_a_file_the_os_will_not_read_is_refused_with_the_path_and_the_reason(
    provider: LocalKeyFileProvider, key_path: Path, how: str
) -> None:
    """An OSError other than a missing file (here ELOOP, ENOTDIR, EIO; EACCES for a service that is not
    root) is the provider's own error, naming the file and the OS's reason, for a provider already running
    and for a new one: never a bare OSError, and never a key."""
    keys = file_keys(key_path)
    reason = UNREADABLE[how](key_path)
    for attempt in (lambda: provider.wrap(DEK.secret, b"aad"), lambda: LocalKeyFileProvider(key_path, create=False)):
        with pytest.raises(KeyProviderError) as info:
            attempt()
        message = str(info.value)
        assert str(key_path) in message
        assert reason in message
        for key in keys:
            assert key.hex() not in message
            assert base64.b64encode(key).decode() not in message


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": "bedside-kek-file", "format_version": 2}',
        b'{"format": "bedside-kek-file", "format_version": 1, "kek_id": "k", "primary_version": 1,'
        b' "versions": [{"version": 1, "state": "active", "key": "c2hvcnQ="}]}',
        b'{"format": "bedside-kek-file", "format_version": 1, "kek_id": "k", "primary_version": 1,'
        b' "versions": [{"version": 1, "state": "retired"}]}',
    ],
)
def test_a_malformed_file_is_refused_without_quoting_it(key_path: Path, content: bytes) -> None:
    key_path.parent.mkdir(parents=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    with pytest.raises(KeyProviderError, match="malformed") as info:
        LocalKeyFileProvider(key_path)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None
    if len(content) > 8:
        assert content.decode() not in str(info.value)


def test_the_provider_never_shows_key_bytes(provider: LocalKeyFileProvider, key_path: Path) -> None:
    keys = file_keys(key_path)
    wrapped = provider.wrap(DEK.secret, b"aad")
    for text in (repr(provider), str(provider), repr(wrapped), str(wrapped)):
        for secret in [*keys, DEK.secret, wrapped.wrapped]:
            assert secret.hex() not in text
            assert repr(secret) not in text
            assert base64.b64encode(secret).decode() not in text


def test_only_32_byte_dek_secrets_are_wrapped(provider: LocalKeyFileProvider) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        provider.wrap(bytes(16), b"aad")


def _lock_is_a_directory(path: Path) -> str:
    path.with_name(path.name + ".lock").unlink(missing_ok=True)
    path.with_name(path.name + ".lock").mkdir()
    return "Is a directory"


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_rotation_the_os_will_not_lock_or_write_is_refused_and_the_keys_stay_usable(
    provider: LocalKeyFileProvider, key_path: Path
) -> None:
    """A rotation or a retirement that cannot take the lock or write the file (a full disk, a read-only
    file system) is the provider's own error naming the file and the reason, never a bare OSError; the file
    and the provider are as they were, and wraps made before still unwrap."""
    wrapped = provider.wrap(DEK.secret, aad_for("Patient/1"))
    before = key_path.read_bytes()
    with _file_size_limit(64), pytest.raises(KeyProviderError) as info:
        provider.add_version()
    assert str(key_path) in str(info.value)
    assert "File too large" in str(info.value)
    assert key_path.read_bytes() == before
    assert [p.name for p in key_path.parent.iterdir() if p.name.endswith(".tmp")] == []

    reason = _lock_is_a_directory(key_path)
    for attempt in (provider.add_version, lambda: provider.retire_version(1)):
        with pytest.raises(KeyProviderError) as info:
            attempt()
        assert str(key_path) in str(info.value)
        assert reason in str(info.value)
    assert key_path.read_bytes() == before
    assert provider.primary_version == 1
    assert provider.unwrap(wrapped, aad_for("Patient/1")) == DEK.secret


def test_a_key_file_that_cannot_be_created_is_refused_with_the_path_and_the_reason(tmp_path: Path) -> None:
    """Creating the file where its directory cannot be made (a dangling link: an unmounted volume) or
    written (a full disk) is the provider's own error, and leaves no file behind."""
    (tmp_path / "volume").symlink_to(tmp_path / "unmounted")
    dangling = tmp_path / "volume" / "keys" / "kek.json"
    with pytest.raises(KeyProviderError) as info:
        LocalKeyFileProvider(dangling)
    assert str(dangling) in str(info.value)
    assert "File exists" in str(info.value)

    full = tmp_path / "keys" / "kek.json"
    with _file_size_limit(64), pytest.raises(KeyProviderError) as info:
        LocalKeyFileProvider(full)
    assert str(full) in str(info.value)
    assert "File too large" in str(info.value)
    assert not full.exists()
