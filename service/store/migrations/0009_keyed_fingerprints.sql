-- Idempotency fingerprints are keyed from here on (`crypto.fingerprint`: an HMAC under a key derived
-- from the tenant's own data key). The ones stored before are unkeyed SHA-256 digests of the request,
-- with which anyone holding the database could confirm a guess of what a short message said. Scrub them
-- now rather than let them live out their day: each becomes the one byte 0x00, which the service reads
-- as "recorded before fingerprints were keyed". A retry of such a request still gets its first response
-- (never the work done twice); only the check that it is the same request is lost, for at most a day.
-- New fingerprints are 33 bytes (a version byte, then the HMAC), so they never equal the marker.

UPDATE idempotency_keys SET request_hash = '\x00'::bytea WHERE length(request_hash) <> 33;

-- The same for signed inbound replies: `inbound_receipts` kept the SHA-256 of each reply's body (the
-- reply's text, with the thread, sender and message ids beside it in the database), for ever. Their new
-- fingerprints are keyed the same way. A scrubbed receipt still answers a redelivery with its message
-- (and could no longer tell a different body), but a redelivery is refused anyway once its signature is
-- five minutes old.
ALTER TABLE inbound_receipts DROP CONSTRAINT inbound_receipts_body_hash_check;
UPDATE inbound_receipts SET body_hash = '\x00'::bytea WHERE length(body_hash) <> 33;
ALTER TABLE inbound_receipts ADD CONSTRAINT inbound_receipts_body_hash_check
    CHECK (length(body_hash) = 33 OR body_hash = '\x00'::bytea);
