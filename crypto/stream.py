"""Chunked sealing of byte streams (attachments), in bounded memory.

A stream becomes a sequence of self-contained sealed chunks, each stored on its own (one row per chunk).
Each chunk is a suite 1 record with its own salt, commitment and nonce, under a distinct magic (`BSDC`)
and key-derivation label, whose header also carries the chunk index and a final-chunk flag. Its AAD is
the header, the length-prefixed object id and the encoded context, so a chunk only opens at its own
position, in its own object, as final or not final exactly as sealed. The opener therefore detects
reordered, dropped, duplicated, foreign and appended chunks, and a stream cut short (no final chunk).

Data is released chunk by chunk before the end of the stream is known to be intact: a consumer must not
act on the plaintext (serve it, index it, commit it) before `StreamOpener.finish()` or the end of
`open_stream` has returned without error.

The classes are plain state machines with no I/O, so asynchronous code can feed them as bytes arrive.
Not thread-safe: one sealer or opener per stream, used from one task.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Mapping

from crypto import _format
from crypto.errors import DecryptionError
from crypto.keys import DataKey

__all__ = [
    "CHUNK_HEADER_BYTES",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "StreamOpener",
    "StreamSealer",
    "open_chunk",
    "open_stream",
    "seal_stream",
]

DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
_CHUNK_LABEL = b"bedside.chunk"
_POSITION = struct.Struct(">QB")  # chunk index (uint64), final flag (0 or 1)
_MAX_INDEX = 2**64 - 1
CHUNK_HEADER_BYTES = (
    _format.PREFIX.size + _POSITION.size + _format.SALT_BYTES + _format.COMMITMENT_BYTES + _format.NONCE_BYTES
)  # 111


def _aad_suffix(object_id: str, context: Mapping[str, str]) -> bytes:
    return _format.text_field(object_id, "object_id") + _format.encode_context(context)


def _seal_chunk_with(
    key: DataKey,
    plaintext: bytes,
    aad_suffix: bytes,
    index: int,
    final: bool,
    *,
    salt: bytes,
    nonce: bytes,
) -> bytes:
    """Seal one chunk with caller-chosen salt and nonce. Only for known-answer tests and this module."""
    if not 0 <= index <= _MAX_INDEX:
        raise ValueError("chunk index out of range")
    head = _format.prefix(_format.CHUNK_MAGIC, key) + _POSITION.pack(index, 1 if final else 0)
    return _format.seal_core(key, _CHUNK_LABEL, head, plaintext, aad_suffix, salt, nonce)


def _seal_chunk(key: DataKey, plaintext: bytes, aad_suffix: bytes, index: int, final: bool) -> bytes:
    salt = os.urandom(_format.SALT_BYTES)
    nonce = os.urandom(_format.NONCE_BYTES)
    return _seal_chunk_with(key, plaintext, aad_suffix, index, final, salt=salt, nonce=nonce)


def _open_chunk(key: DataKey, chunk: bytes, aad_suffix: bytes, index: int) -> tuple[bytes, bool]:
    _format.check_prefix(_format.prefix(_format.CHUNK_MAGIC, key), chunk)
    if len(chunk) < CHUNK_HEADER_BYTES:
        raise DecryptionError
    found_index, final = _POSITION.unpack_from(chunk, _format.PREFIX.size)
    if found_index != index or final not in (0, 1):
        raise DecryptionError
    info = _format.kdf_info(_CHUNK_LABEL, key)
    return _format.open_core(key, info, chunk, CHUNK_HEADER_BYTES, aad_suffix), final == 1


def open_chunk(
    key: DataKey, chunk: bytes, *, object_id: str, context: Mapping[str, str], index: int
) -> tuple[bytes, bool]:
    """Open the chunk expected at position `index` of `object_id`: returns (plaintext, is_final).

    For random access (e.g. HTTP range requests). The caller must know how many chunks the object has
    and check that the last one it reads, if it is the object's last, says `is_final`.
    """
    try:
        aad_suffix = _aad_suffix(object_id, context)
    except ValueError:
        raise DecryptionError from None
    return _open_chunk(key, chunk, aad_suffix, index)


class StreamSealer:
    """Cut a byte stream into `chunk_size` pieces and seal each as soon as it is known not to be last.

    Call `update(data)` any number of times, then `finish()` once. At most `chunk_size` bytes plus the
    current `data` are held. An empty stream becomes one empty final chunk.
    """

    __slots__ = ("_aad_suffix", "_buffer", "_chunk_size", "_done", "_index", "_key")

    def __init__(
        self,
        key: DataKey,
        *,
        object_id: str,
        context: Mapping[str, str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be an integer in [1, {MAX_CHUNK_SIZE}]")
        self._key = key
        self._aad_suffix = _aad_suffix(object_id, context)
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._index = 0
        self._done = False

    def __repr__(self) -> str:
        return f"StreamSealer(key_id={self._key.id!s}, chunks_sealed={self._index}, done={self._done})"

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add `data`; return the chunks that are now complete (possibly none), in order."""
        if self._done:
            raise ValueError("StreamSealer.update() after finish()")
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        size = self._chunk_size
        # A full buffer is sealed only once more data exists, so it is certainly not the final chunk.
        while len(view):
            if len(self._buffer) == size:
                out.append(self._emit(final=False))
            take = size - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
        return out

    def finish(self) -> bytes:
        """Seal and return the final chunk (what is buffered; empty only if the whole stream was)."""
        if self._done:
            raise ValueError("StreamSealer.finish() called twice")
        self._done = True
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> bytes:
        chunk = _seal_chunk(self._key, bytes(self._buffer), self._aad_suffix, self._index, final)
        self._buffer.clear()
        self._index += 1
        return chunk


class StreamOpener:
    """Open the chunks of one stream in order; `finish()` proves the stream was complete.

    Any manipulation raises `DecryptionError`, after which the opener refuses further use.
    """

    __slots__ = ("_aad_suffix", "_failed", "_final_seen", "_index", "_key")

    def __init__(self, key: DataKey, *, object_id: str, context: Mapping[str, str]) -> None:
        self._key = key
        self._aad_suffix = _aad_suffix(object_id, context)
        self._index = 0
        self._final_seen = False
        self._failed = False

    def __repr__(self) -> str:
        return f"StreamOpener(key_id={self._key.id!s}, chunks_opened={self._index}, complete={self._final_seen})"

    def update(self, chunk: bytes) -> bytes:
        """Open the next chunk and return its plaintext (untrusted until `finish()` succeeds)."""
        if self._failed or self._final_seen:
            # A chunk after the final one was appended or duplicated.
            self._failed = True
            raise DecryptionError
        try:
            plaintext, final = _open_chunk(self._key, chunk, self._aad_suffix, self._index)
        except DecryptionError:
            self._failed = True
            raise
        self._index += 1
        self._final_seen = final
        return plaintext

    def finish(self) -> None:
        """Raise `DecryptionError` unless the final chunk was opened (the stream was not truncated)."""
        if self._failed or not self._final_seen:
            self._failed = True
            raise DecryptionError


def seal_stream(
    key: DataKey,
    data: Iterable[bytes],
    *,
    object_id: str,
    context: Mapping[str, str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[bytes]:
    """Yield the sealed chunks of the byte stream `data` (pieces of any size), lazily, in order."""
    sealer = StreamSealer(key, object_id=object_id, context=context, chunk_size=chunk_size)
    for piece in data:
        yield from sealer.update(piece)
    yield sealer.finish()


def open_stream(
    key: DataKey, chunks: Iterable[bytes], *, object_id: str, context: Mapping[str, str]
) -> Iterator[bytes]:
    """Yield the plaintext of each sealed chunk; raise `DecryptionError` on any manipulation.

    Truncation is only detected when the input ends, so treat the output as untrusted until this
    generator is exhausted without error.
    """
    try:
        opener = StreamOpener(key, object_id=object_id, context=context)
    except ValueError:
        raise DecryptionError from None
    for chunk in chunks:
        yield opener.update(chunk)
    opener.finish()
