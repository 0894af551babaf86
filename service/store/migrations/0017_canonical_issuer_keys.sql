-- A trusted issuer key is stored in one encoding only: the canonical PEM the service writes.
--
-- The service stores every issuer key as `crypto/issuer_keys.py` re-serialises it: a SubjectPublicKeyInfo
-- PEM, base64 in lines of 64 characters ending in LF, the EC point uncompressed. But the database took any
-- text, and the application's login may INSERT issuer keys (that is how an admin registers one). Two guards
-- compare keys as stored: 0013's trigger (a revoked key is never trusted again) compares PEM text, so the
-- revoked key came back trusted with CRLF line ends; 0016's index (one name per key) compares the SHA-256
-- of the DER, so the same RSA key as PKCS#1 (`BEGIN RSA PUBLIC KEY`), or the same P-256 key with its point
-- compressed, had a second name. The service's key loader (and PyJWT's) reads all of those as one key.
--
-- Now an active key's PEM must be exactly the canonical one for its algorithm, for every role: so equal text
-- and an equal fingerprint mean the same key again, for those guards and for the store's queries that
-- compare PEM text. A revoked row is left out of the check: it is trusted by nobody, the service only ever
-- writes canonical ones, and an active key that is not canonical can still be revoked (and so go out).
--
-- The DER checked is the whole SubjectPublicKeyInfo up to the key: Ed25519 and P-256 keys have a fixed
-- prefix and size; an RSA key (2048 bits and more) the outer SEQUENCE's DER header, which must say the key's
-- exact length, then the AlgorithmIdentifier rsaEncryption with NULL parameters (not RSASSA-PSS, not absent
-- parameters, which the loader also takes). Inside the BIT STRING the loader accepts strict DER only, so one
-- RSA key has one encoding there.
--
-- A database where an active key is stored otherwise (the service's login wrote it, not the service) is left
-- as it is: a migration cannot re-encode every such key (a compressed point), and revoking a portal's key
-- unasked would lock its users out. The migration fails instead, naming each such key (tenant, issuer, kid),
-- and runs once the operator has revoked them with `bedside issuer revoke` (after giving the portal a new
-- key with `bedside issuer add`, which stores it canonically, if it signs with that one).

CREATE FUNCTION bedside_issuer_key_is_canonical(algorithm text, pem text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT COALESCE(
            -- The layout: exactly the PEM of that DER as the service writes it (no CR, no blank, short or
            -- long lines, no text around it, padding bits zero).
            pem = E'-----BEGIN PUBLIC KEY-----\n'
                || pg_catalog.regexp_replace(
                    pg_catalog.translate(pg_catalog.encode(der, 'base64'), E'\n', ''), '.{1,64}', E'\\&\n', 'g'
                )
                || E'-----END PUBLIC KEY-----\n'
            -- The DER: the canonical SubjectPublicKeyInfo of a key of the row's algorithm.
            AND CASE algorithm
                WHEN 'EdDSA' THEN pg_catalog.length(der) = 44
                    AND pg_catalog.substr(der, 1, 12) = pg_catalog.decode('302a300506032b6570032100', 'hex')
                WHEN 'ES256' THEN pg_catalog.length(der) = 91
                    AND pg_catalog.substr(der, 1, 27)
                        = pg_catalog.decode('3059301306072a8648ce3d020106082a8648ce3d03010703420004', 'hex')
                WHEN 'RS256' THEN pg_catalog.substr(der, 1, pg_catalog.length(rsa_start)) = rsa_start
                ELSE false
            END,
            false
        )
        FROM (
            -- The base64 between the armour lines, decoded only when it is well-formed (else NULL: false).
            SELECT CASE
                WHEN body ~ '^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$'
                THEN pg_catalog.decode(body, 'base64')
            END AS der
            FROM (
                SELECT pg_catalog.translate(
                    pg_catalog.substring(pem, E'^-----BEGIN PUBLIC KEY-----\n(.*)-----END PUBLIC KEY-----\n$'),
                    E'\n',
                    ''
                ) AS body
            ) AS armoured
        ) AS decoded,
        LATERAL (
            -- What an RSA key of this length starts with: the outer SEQUENCE's header in DER (the length in
            -- the fewest bytes; 2048- to 4096-bit keys take two), then rsaEncryption with NULL parameters.
            SELECT pg_catalog.decode(
                CASE
                    WHEN pg_catalog.length(der) - 4 BETWEEN 256 AND 65535
                        THEN '3082' || pg_catalog.lpad(pg_catalog.to_hex(pg_catalog.length(der) - 4), 4, '0')
                    WHEN pg_catalog.length(der) - 5 BETWEEN 65536 AND 16777215
                        THEN '3083' || pg_catalog.lpad(pg_catalog.to_hex(pg_catalog.length(der) - 5), 6, '0')
                    WHEN pg_catalog.length(der) - 6 >= 16777216
                        THEN '3084' || pg_catalog.lpad(pg_catalog.to_hex(pg_catalog.length(der) - 6), 8, '0')
                END || '300d06092a864886f70d0101010500',
                'hex'
            ) AS rsa_start
        ) AS rsa
    $$;
REVOKE ALL ON FUNCTION bedside_issuer_key_is_canonical(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bedside_issuer_key_is_canonical(text, text) TO bedside_app;

DO $$
DECLARE
    found text;
    how_many integer;
BEGIN
    SELECT pg_catalog.string_agg(
               pg_catalog.format('tenant %s: issuer %s kid %s', t.slug, i.issuer, k.kid),
               E'\n' ORDER BY t.slug, i.issuer, k.kid
           ),
           pg_catalog.count(*)
    INTO found, how_many
    FROM issuer_keys k
    JOIN issuers i ON i.tenant_id = k.tenant_id AND i.id = k.issuer_id
    JOIN tenants t ON t.id = k.tenant_id
    WHERE k.revoked_at IS NULL AND NOT bedside_issuer_key_is_canonical(k.algorithm, k.public_key_pem);
    IF how_many > 0 THEN
        RAISE EXCEPTION '% trusted issuer key(s) are not stored as the canonical SubjectPublicKeyInfo PEM that '
            'Bedside writes (the service did not write them); a trusted key may be stored that way only. '
            'Nothing was changed',
            how_many
            USING DETAIL = found,
                  HINT = 'Revoke each of these keys with `bedside issuer revoke --tenant T --issuer ISS --kid K` '
                      '(if the portal still signs with it, first give it a new key with `bedside issuer add`, '
                      'which stores it canonically), then run `bedside migrate` again.';
    END IF;
END
$$;

ALTER TABLE issuer_keys ADD CONSTRAINT issuer_keys_canonical_pem
    CHECK (revoked_at IS NOT NULL OR bedside_issuer_key_is_canonical(algorithm, public_key_pem));
