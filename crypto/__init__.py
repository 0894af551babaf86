"""Bedside crypto: pure (stdlib + `cryptography` only; `pkcs11` only in `crypto.kek_pkcs11`).

Envelope encryption. Each patient has a data key (DEK, `crypto.keys.DataKey`: 16-byte UUID id, uint32
version, 32 secret bytes). DEKs are stored only wrapped by a key-encryption key (KEK) from a provider
(`crypto.kek`: local key file or PKCS#11), with an AAD binding DEK id, DEK version, tenant and patient
(`crypto.kek.dek_wrap_aad`), and cached unwrapped within bounds (`crypto.dek_cache`). Records are
sealed with `crypto.envelope.seal` / `open_record` (`open_records` for a page under one key),
attachments with `crypto.stream`. Every failure to open anything raises the one opaque
`crypto.errors.DecryptionError`. This package imports nothing at import time: import the submodule you
need.

Record format, version 1 (all integers big-endian)
--------------------------------------------------

    offset  size  field
         0     4  magic        "BSDR" (42 53 44 52)
         4     1  version      0x01
         5     1  suite        0x01 = HKDF-SHA256 -> AES-256-GCM key + 256-bit key commitment
         6    16  dek_id       UUID, RFC 4122 byte order
        22     4  dek_version  uint32
        26    32  salt         random per record
        58    32  commitment   key commitment (see below)
        90    12  nonce        random per record
       102   n+16 ciphertext || GCM tag (16)            header = bytes 0..101; overhead = 118 bytes

Suite 1:
    okm        = HKDF-SHA256(ikm = DEK secret, salt = salt,
                             info = "bedside.record" || version || suite || dek_id || u32(dek_version),
                             length = 64)
    aes_key    = okm[0:32]              commitment = okm[32:64]
    AAD        = header (bytes 0..101) || encode_context(context)
    ciphertext = AES-256-GCM(aes_key, nonce, plaintext, AAD)

    encode_context(ctx) = u32(len(ctx)) || for each (k, v) in order: u32(len(k)) || k || u32(len(v)) || v
    (UTF-8, length in bytes). The context is an ordered str -> str mapping, e.g. tenant, "table.column",
    row id, thread id, sender, schema version: any change (value, key, order, an entry added or removed)
    and the record does not open.

Opening checks, in order, and fails with `DecryptionError` on the first miss: length >= 118; magic,
version and suite exactly as above (an unknown version or suite is never "fallen back" from); dek_id and
dek_version equal to the key's; the commitment equal, compared with `hmac.compare_digest`, to the one
derived from the key and salt (so no record opens under two keys); then the GCM tag. A fresh key per
record means the random 96-bit nonce never repeats under one AES key, so there is no 2^32-messages
limit per DEK. `crypto.envelope.read_key_ref` reads (dek_id, dek_version) without decrypting.

Attachment chunks (`crypto.stream`) use the same scheme with magic "BSDC", label "bedside.chunk", and
two more header fields after dek_version: chunk index (uint64) and final flag (0x00 / 0x01), so the
header is 111 bytes; their AAD is header || u32(len(object_id)) || object_id || encode_context(context).
The known-answer vectors in tests/unit/crypto/vectors/ pin both formats byte for byte.
"""
