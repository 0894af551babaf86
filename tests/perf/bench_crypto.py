"""Seal+open throughput of the record format against bare AES-256-GCM, in one run on one machine.

    .venv/bin/python tests/perf/bench_crypto.py [--seconds 2] [--rounds 5]

For 1 KiB and 64 KiB records it measures, in alternating rounds, (a) `crypto.envelope.seal` then
`open_record` with a realistic context, and (b) bare `AESGCM.encrypt` then `decrypt` with a fixed key and
a fresh nonce. It prints the median ops/s of each (one op = one seal plus one open) and their ratio. The
difference is the record format's cost: HKDF per record, the key commitment, header and AAD encoding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from uuid import uuid4

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.envelope import open_record, seal
from crypto.keys import DataKey

CONTEXT = {
    "tenant": str(uuid4()),
    "column": "messages.body",
    "row": str(uuid4()),
    "thread": str(uuid4()),
    "sender": "Practitioner/12345",
    "schema": "1",
}


def ops_per_second(op: Callable[[], None], seconds: float) -> float:
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(50):
            op()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    key = DataKey.generate()
    bare = AESGCM(os.urandom(32))
    aad = b"x" * 96  # about the size of our header plus context
    print(f"{'size':>7} {'envelope ops/s':>15} {'bare AESGCM ops/s':>18} {'ratio':>6}")
    for size in (1024, 64 * 1024):
        plaintext = os.urandom(size)

        def envelope(plaintext: bytes = plaintext) -> None:
            open_record(key, seal(key, plaintext, CONTEXT), CONTEXT)

        def aesgcm(plaintext: bytes = plaintext) -> None:
            nonce = os.urandom(12)
            bare.decrypt(nonce, bare.encrypt(nonce, plaintext, aad), aad)

        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(ops_per_second(envelope, args.seconds))
            theirs.append(ops_per_second(aesgcm, args.seconds))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{size // 1024:>5}Ki {a:>15,.0f} {b:>18,.0f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
