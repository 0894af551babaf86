"""Strategies and a harness for fuzzing the HTTP API (`tests/api/test_fuzz_no_500.py`).

A generated request is what goes on the wire: the path and query already percent-encoded (so junk reaches
the router as sent, `%00` and `%FF` included), the body as bytes (malformed JSON, non-UTF-8, duplicate
keys, NaN and Infinity, numbers no integer type holds, deep nesting), and the headers the route reads.
Bodies are built from the route's own schema (`Route.body`), field by field: mostly plausible values, many
of them real ids from the world the test built, so that requests get past parsing into the domain and the
database; the rest wrong types, edge values and junk. The canary is planted in every piece of text a
request carries: no error body may contain it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote
from uuid import UUID

from hypothesis import assume
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel, NaiveDatetime

from service.api.routes import Route

CANARY = "CANARY-PHI-7731"

# -- JSON the standard library will not write -------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is: numbers no integer type holds, NaN, nesting past any parser's limit."""

    text: str


@dataclass(frozen=True)
class Obj:
    """A JSON object as its members in order; a name may come twice."""

    members: tuple[tuple[str, Any], ...]


def dump(value: Any, ascii_only: bool = False) -> str:
    """`value` as JSON text. Floats NaN and Infinity come out as those literals (as `json.dumps` does)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        inner = ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}" for k, v in value.members)
        return "{" + inner + "}"
    if isinstance(value, dict):
        return dump(Obj(tuple(value.items())), ascii_only)
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def encode(value: Any, ascii_only: bool = False) -> bytes:
    # surrogatepass: a lone surrogate written unescaped becomes bytes that are not UTF-8, as a client could send.
    return dump(value, ascii_only).encode("utf-8", "surrogatepass")


# -- values ---------------------------------------------------------------------------------------------

EDGE_INTS = (
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**62,
    2**62 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
)
RAW_NUMBERS = tuple(
    Raw(text)
    for text in (
        "NaN",
        "Infinity",
        "-Infinity",
        "9" * 4400,  # past Python's 4300-digit limit for int(str)
        "-" + "9" * 4400,
        "1e400",
        "-1e400",
        "1e-400",
        "0.5",
        "1.0",
        "-0",
        "1E2",
        "01",
        "+1",
        ".5",
        "0x10",
    )
)
DEEP = (
    Raw("[" * 5000 + "]" * 5000),
    Raw('{"a":' * 2000 + "1" + "}" * 2000),
    Raw("[" * 100 + "]" * 100),
)
EDGE_STRINGS = (
    "",
    " ",
    "\x00",
    "\x00" + CANARY,
    CANARY + "\x00",
    "\ud800" + CANARY,
    "\udfff",
    "\u202e" + CANARY,
    "\ufeff",
    "\n",
    "\t" + CANARY,
    "null",
    "true",
    "0",
    "-1",
    "NaN",
    "%00",
    "%ff" + CANARY,
    "../" * 10,
    "Patient/1\x00",
    "Patient/1\n",
    " Patient/1",
    "Patient/",
    "/1",
    "Patient//1",
    "Patient/" + "9" * 65,
    "patient/1",
    "Practitioner/7 ",
    "CareTeam/cardio\t",
    "Patient/1/" + CANARY,
    "' OR 1=1 --" + CANARY,
    "${jndi:ldap://x}" + CANARY,
    "<script>" + CANARY,
    "\U0001f600" + CANARY,
    "é" * 10,
)

# What a database, a log line or a parser may choke on: NUL, lone surrogates, control and format characters.
NASTY = tuple(
    f"{before}{char}{after}"
    for char in ("\x00", "\ud800", "\x1b[31m", "\r\n", "\x7f", "\u2028", "\u202e")
    for before, after in (("", ""), ("Patient/1", ""), ("", CANARY))
)


def texts(longest: int = 70_000) -> st.SearchStrategy[str]:
    """Text as a client might send it, the canary in most of it; at most about `longest` characters
    (a URL or a header line has to stay within what the HTTP parser reads: 8 KiB)."""
    lengths = tuple(n for n in (200, 201, 1000, 65535, 65536, 65537, 70_000) if n <= longest)
    return st.one_of(
        st.sampled_from(EDGE_STRINGS),
        st.sampled_from(NASTY),
        st.sampled_from(NASTY),
        st.text(max_size=30).map(lambda t: t + CANARY),
        st.integers(1, min(4000, longest)).map(lambda n: (CANARY * (n // len(CANARY) + 1))[:n] + CANARY),
        st.sampled_from(lengths).map(lambda n: ("x" * n)[: n - len(CANARY)] + CANARY),
    )


def short_texts() -> st.SearchStrategy[str]:
    """Text for a URL: short enough that a few of them, percent-encoded, fit in one request line."""
    return texts(longest=200)


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(EDGE_INTS),
        st.integers(),
        st.floats(),
        texts(),
        st.sampled_from(RAW_NUMBERS),
    )


def junk() -> st.SearchStrategy[Any]:
    """Any JSON value at all: what a field of the wrong type gets."""
    return st.one_of(
        st.recursive(
            scalars(),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=12) | st.just(CANARY), children, max_size=4)
            ),
            max_leaves=8,
        ),
        st.sampled_from(DEEP),
    )


TIME_STRINGS = (
    "0001-01-01T00:00:00+14:00",  # before the first moment in UTC
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59-14:00",  # after the last
    "9999-12-31T23:59:59.999999-23:59",
    "1899-12-31T23:59:59Z",
    "9001-01-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T23:59:60Z",
    "+275760-09-13T00:00:00Z",
    "2026-01-01",
    "2026-01-01T00:00:00",
    "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00+99:99",
    "2026-01-01T00:00:00.0000000000001Z",
    "2026-01-01t00:00:00z",
    "2026-01-01 00:00:00+00:00",
    "2026-W01-1T00:00:00Z",
    "1767225600",
    "1e10",
    "now",
    "",
)


def times() -> st.SearchStrategy[str]:
    """RFC 3339 times: ordinary ones, ones that overflow once converted to UTC, and ones that are not times."""
    offsets = st.sampled_from(("Z", "+00:00", "-23:59", "+23:59", "+14:00", "-14:00", ""))
    return st.one_of(
        st.sampled_from(TIME_STRINGS),
        st.builds(lambda d, o: d.isoformat() + o, st.datetimes(min_value=datetime(1, 1, 1)), offsets),
        st.builds(lambda d, o: d.isoformat() + o, st.datetimes(datetime(2026, 1, 1), datetime(2027, 1, 1)), offsets),
    )


def int_strings() -> st.SearchStrategy[str]:
    """What a query parameter that takes an integer may be sent."""
    edge = (*(str(n) for n in EDGE_INTS), "2", "3", "50", "100", "101", "200", "201", "500", "501", "10000")
    odd = ("9" * 4400, "-" + "9" * 4400, "1e3", "1.0", "0x10", " 1", "1 ", "+1", "", "NaN", "Infinity", "١٢", "true")
    return st.one_of(st.sampled_from(edge + odd), st.integers(-10, 10**20).map(str))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursors(ids: Sequence[str]) -> st.SearchStrategy[str]:
    """Cursors of both kinds the API hands out (`time|uuid` and `d<seq>`), forged, broken and overlong."""
    ident = st.sampled_from([*ids, "00000000-0000-0000-0000-000000000000"]) | st.uuids().map(str) | short_texts()
    return st.one_of(
        st.builds(lambda t, i: b64(f"{t}|{i}".encode("utf-8", "surrogatepass")), times(), ident),
        st.builds(lambda d, n: b64(f"{d}{n}".encode()), st.sampled_from("adx"), int_strings()),
        st.binary(max_size=60).map(b64),
        st.sampled_from(("", "=", "====", "%%", "not a cursor", "x" * 101, b64(b"|"), b64(b"||"), b64(b"\xff\xfe"))),
        short_texts(),
    )


FLAGS = ("true", "false", "1", "0", "yes", "no", "on", "off", "True", "maybe", "")


# -- the world a route is fuzzed in ----------------------------------------------------------------------


@dataclass
class World:
    """Real things of the tenant the fuzzed requests mostly name, built through the API."""

    ids: dict[str, str]  # what -> the id or path segment that names it: consent, thread, message, team, ...
    references: dict[str, list[str]]  # kind -> references that exist: patients, practitioners, teams, others
    identities: dict[str, dict[str, str]]  # caller -> the role, sub (and act_for) of their tokens
    inbound_secret: str
    public_key_pem: str  # a key not yet trusted, so that adding it succeeds
    issuer: str  # an issuer of the world's own, with a key of kid portal-key-1 (not the portal the callers use)

    @property
    def uuids(self) -> list[str]:
        return [v for v in self.ids.values() if _is_uuid(v)]


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


WEBHOOK_URL = "https://93.184.215.14/hook"  # a public IP literal: nothing is resolved, no worker runs
PLAIN = ("Hello " + CANARY, CANARY, "Is 5 mg enough? " + CANARY)
BAD_URLS = (
    "http://127.0.0.1/hook",
    "https://[::1]/",
    "https://10.0.0.1/",
    "https://169.254.169.254/latest/meta-data/",
    "https://[::ffff:169.254.169.254]/",
    "https://0x7f.1/",
    "https://2130706433/",
    "https://93.184.215.14:0/",
    "https://93.184.215.14:99999/",
    "https://user:" + CANARY + "@93.184.215.14/",
    "https://93.184.215.14/#" + CANARY,
    "https://93.184.215.14/ " + CANARY,
    "ftp://93.184.215.14/",
    "https://",
    "https:///path",
    "//93.184.215.14/",
)


def field_values(world: World) -> dict[str, st.SearchStrategy[Any]]:
    """Values by field name that get a request past parsing into the domain (mostly valid, some not)."""
    refs = world.references
    patients = st.sampled_from(refs["patients"])
    practitioners = st.sampled_from(refs["practitioners"])
    teams = st.sampled_from(refs["teams"])
    real = st.sampled_from(world.uuids)
    return {
        "patient": patients,
        "confirm": patients,
        "grantee": st.sampled_from(refs["practitioners"] + refs["teams"] + refs["others"]),
        "participants": st.lists(practitioners | teams, min_size=1, max_size=3),
        "members": st.lists(practitioners, max_size=4),
        "team": teams | st.just("CareTeam/new-team"),
        "subscriber": practitioners | teams,
        "sender": practitioners,
        "witness": practitioners,
        "url": st.one_of(
            st.sampled_from((WEBHOOK_URL, WEBHOOK_URL + "?token=" + CANARY)),
            st.sampled_from(BAD_URLS),
            short_texts().map(lambda t: WEBHOOK_URL + "/" + t),
        ),
        "issuer": st.sampled_from((world.issuer, "https://portal.new.test")),
        "public_key_pem": st.just(world.public_key_pem),
        "kid": st.sampled_from(("portal-key-2", "portal-key-1")),
        "item": st.sampled_from(("DocumentReference/1", "Binder/7", "")),
        "purpose": st.sampled_from(("TREAT", "ETREAT", "HPAYMT", "outbound", "inbound", "ed25519")),
        "text_version": st.just("consent-text-v3"),
        "document_ref": st.just("scan-0042"),
        "thread_id": st.just(world.ids["thread"]) | real,
        "in_reply_to": st.just(world.ids["message"]) | real,
        "attachment_ids": st.lists(st.just(world.ids["attachment"]) | real, max_size=3),
        "up_to": st.sampled_from((0, 1, 2, 3)),
    }


def valid(annotation: Any, name: str, values: Mapping[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A value for field `name` of type `annotation` that could well be accepted."""
    if name in values:
        return values[name]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return valid(args[0], name, values)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else valid(a, name, values) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(valid(args[0], name, values), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return document(annotation, values)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(0, 5)
    if annotation is UUID:
        return st.uuids().map(str)
    if _is_time(annotation):
        ordinary = st.datetimes(datetime(2025, 1, 1), datetime(2027, 1, 1))
        return st.builds(lambda d, o: d.isoformat() + o, ordinary, st.sampled_from(("Z", "+00:00", "-05:00")))
    if annotation is str:
        return st.sampled_from(PLAIN)
    raise AssertionError(f"no strategy for fields of type {annotation!r}: add one to fuzz_helpers.valid and edge")


def edge(annotation: Any) -> st.SearchStrategy[Any]:
    """A value of the field's own type at or past its edges: extreme numbers, strange text, times that
    overflow, lists too long."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return edge(args[0])
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(edge(a) for a in args if a is not type(None)))
    if origin is Literal:
        return st.sampled_from(args).map(lambda a: str(a).upper()) | texts()
    if origin is list:
        return st.lists(edge(args[0]), min_size=1, max_size=3) | st.lists(st.just(None), min_size=19, max_size=30)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return st.just({}) | junk() | document(annotation, {}, mutations=st.integers(1, 2))
    if annotation is bool:
        return st.sampled_from(("true", 0, 1, "yes"))
    if annotation is int:
        return st.sampled_from(EDGE_INTS) | st.sampled_from(RAW_NUMBERS)
    if annotation is UUID:
        return st.sampled_from(("not-a-uuid", "00000000-0000-0000-0000-000000000000", "{" + "0" * 32 + "}")) | texts()
    if _is_time(annotation):
        return times()
    if annotation is str:
        return texts()
    raise AssertionError(f"no strategy for fields of type {annotation!r}: add one to fuzz_helpers.valid and edge")


def unsupported_fields(model: type[BaseModel]) -> list[str]:
    """The fields of `model`, and of the models within it, that `valid` or `edge` has no strategy for."""
    missing = []
    for name, info in model.model_fields.items():
        try:
            valid(info.annotation, name, {})
            edge(info.annotation)
        except AssertionError:
            missing.append(f"{model.__name__}.{name}")
        for nested in _models_in(info.annotation):
            missing += unsupported_fields(nested)
    return missing


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_time(annotation: Any) -> bool:
    return annotation in (AwareDatetime, NaiveDatetime) or (
        isinstance(annotation, type) and issubclass(annotation, datetime)
    )


# How many things a fuzzed body or query gets wrong: mostly one, so that the rest of it reaches the domain.
MUTATIONS = st.sampled_from((1, 1, 1, 2, 3))
UNCHANGED = st.just(0)


def document(
    model: type[BaseModel],
    values: Mapping[str, st.SearchStrategy[Any]],
    seeds: Sequence[Mapping[str, Any]] = (),
    mutations: st.SearchStrategy[int] = UNCHANGED,
) -> st.SearchStrategy[Obj]:
    """A JSON object shaped like `model`: one of `seeds` (bodies known to be accepted) or, without seeds,
    every field plausible; then `mutations` of them: a field of its type at its edge, of another type,
    missing or repeated, or a member the model does not have."""
    fields = [(info.alias or name, info) for name, info in model.model_fields.items()]

    @st.composite
    def build(draw: st.DrawFn) -> Obj:
        if seeds:
            members = list(draw(st.sampled_from(seeds), label="seed").items())
        else:
            members = [
                (key, draw(valid(info.annotation, key, values), label=key))
                for key, info in fields
                if info.is_required() or draw(st.booleans(), label=f"{key}?")
            ]
        for _ in range(draw(mutations, label="mutations")):
            kind = draw(st.sampled_from(("edge", "edge", "edge", "type", "drop", "repeat", "unknown")), label="kind")
            key, info = draw(st.sampled_from(fields), label="field")
            if kind == "unknown":
                unknown = draw(st.sampled_from(("surprise", CANARY, "", "__proto__", key.upper())), label="name")
                members.append((unknown, draw(junk())))
            elif kind == "drop":
                members = [m for m in members if m[0] != key]
            elif kind == "repeat":
                members.append((key, draw(valid(info.annotation, key, values) | edge(info.annotation))))
            else:
                value = draw(edge(info.annotation) if kind == "edge" else junk(), label=kind)
                members = [m for m in members if m[0] != key] + [(key, value)]
        return Obj(tuple(members))

    return build()


def body_bytes(
    model: type[BaseModel] | None,
    values: Mapping[str, st.SearchStrategy[Any]],
    seeds: Sequence[Mapping[str, Any]] = (),
    *,
    fuzzed: bool,
) -> st.SearchStrategy[bytes]:
    """Request bodies: shaped like `model` (when the route has one) and, when `fuzzed`, maybe mutated or
    damaged, or anything at all."""
    if not fuzzed:
        if model is None:
            return st.just(b"")
        return st.builds(encode, document(model, values, seeds))
    anything = st.one_of(
        st.builds(encode, junk(), st.booleans()),
        st.binary(max_size=200),
        st.sampled_from(
            (
                b"",
                b"{",
                b'{"a":',
                b"\xef\xbb\xbf{}",  # a byte order mark
                b"{}",
                b"[]",
                b"null",
                b'{"body": "' + CANARY.encode() + b'\xff\xfe"}',
                b'{"' + CANARY.encode() + b'": 1}',
                b"{" + b'"a": 1, ' * 2000 + b'"a": 2}',
                b'{"body": "' + b"x" * 300_000 + CANARY.encode() + b'"}',  # past the body limit
            )
        ),
    )
    if model is None:
        return anything
    shaped = st.builds(encode, document(model, values, seeds, mutations=MUTATIONS), st.booleans())
    return st.one_of(shaped, shaped, shaped, shaped, st.builds(_damage, shaped, st.data()), anything)


def _damage(raw: bytes, data: st.DataObject) -> bytes:
    """Cut `raw` short, or put bytes that are not UTF-8 (or a NUL) into it."""
    at = data.draw(st.integers(0, len(raw)), label="at")
    how = data.draw(st.sampled_from(("cut", "invalid-utf8", "nul")), label="how")
    if how == "cut":
        return raw[:at]
    if how == "invalid-utf8":
        return (
            raw[:at] + data.draw(st.sampled_from((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80"))) + raw[at:]
        )
    return raw[:at] + b"\x00" + raw[at:]


# -- queries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query parameter's values: ones that could be accepted, and ones at or past its edges."""

    valid: st.SearchStrategy[str]
    edge: st.SearchStrategy[str]


def query_params(world: World) -> dict[str, Param]:
    """Every query parameter of the route table, by name (a name missing here fails the test)."""
    refs = world.references

    def refs_of(*kinds: str) -> st.SearchStrategy[str]:
        return st.sampled_from([r for kind in kinds for r in refs[kind]])

    def one_of(*choices: str) -> Param:
        return Param(st.sampled_from(choices), short_texts() | st.sampled_from(choices).map(str.upper))

    def number(low: int, high: int) -> Param:
        return Param(st.integers(low, high).map(str), int_strings())

    def time() -> Param:
        ordinary = st.datetimes(datetime(2025, 1, 1), datetime(2027, 1, 1)).map(lambda d: d.isoformat() + "+00:00")
        return Param(ordinary, times())

    flags = Param(st.sampled_from(("true", "false")), st.sampled_from(FLAGS) | short_texts())
    return {
        "limit": number(1, 50),
        "after": number(0, 3),
        "before": number(1, 4),
        "index": number(0, 20),
        "size": number(1, 20),
        "from": number(1, 20),
        "to": number(1, 20),
        "start": number(0, 20),
        "end": number(1, 20),
        "cursor": Param(cursors(world.uuids), cursors(world.uuids)),
        "since": time(),
        "until": time(),
        "as_of": time(),
        "patient": Param(refs_of("patients"), short_texts()),
        "actor": Param(refs_of("practitioners", "patients"), short_texts()),
        "subscriber": Param(refs_of("practitioners", "teams"), short_texts()),
        "action": one_of("message:send", "key:shred", "auth:denied", "x:y"),
        "outcome": one_of("success", "denied", "failure"),
        "resource_type": Param(st.sampled_from(("Thread", "Message", "Route")), short_texts()),
        "resource_id": Param(st.sampled_from(world.uuids), short_texts()),
        "order": one_of("newest", "oldest"),
        "format": one_of("json", "fhir", "ndjson"),
        "status": one_of("open", "closed", "pending", "succeeded", "held", "dead"),
        "unread": flags,
        "reviewed": flags,
        "thread_id": Param(st.sampled_from(world.uuids), short_texts()),
    }


def query_string(names: Sequence[str], params: Mapping[str, Param], *, fuzzed: bool) -> st.SearchStrategy[str]:
    """A raw query string: some of the route's parameters with plausible values and, when `fuzzed`, a few
    mutations (a value at its edge or of raw bytes, a parameter repeated, unknown or nameless), or junk."""
    mutations = MUTATIONS if fuzzed else UNCHANGED

    @st.composite
    def build(draw: st.DrawFn) -> str:
        chosen = draw(st.lists(st.sampled_from(names), unique=True), label="params") if names else []
        pairs = [(escaped(n), escaped(draw(params[n].valid, label=n))) for n in chosen]
        for _ in range(draw(mutations, label="mutations")):
            kind = draw(st.sampled_from(("edge", "edge", "edge", "bytes", "repeat", "unknown")), label="kind")
            name = draw(st.sampled_from(names), label="param") if names and kind != "unknown" else None
            if name is None:
                unknown = draw(st.sampled_from(("surprise", escaped(CANARY), "", "%00", "%FF")), label="name")
                pairs.append((unknown, escaped(draw(short_texts()))))
                continue
            if kind == "bytes":
                value = percent(draw(st.binary(max_size=20), label="bytes"))
            else:
                value = escaped(draw(params[name].edge | params[name].valid, label=name))
            if kind != "repeat":
                pairs = [p for p in pairs if p[0] != escaped(name)]
            pairs.append((escaped(name), value))
        return "&".join(f"{k}={v}" for k, v in pairs)

    if not fuzzed:
        return build()
    odd = st.sampled_from(("&&&", "=", "a", "%", "%G0", "a=1&&b", escaped(CANARY) + "&" + escaped(CANARY)))
    return st.one_of(build(), build(), build(), build(), odd)


# -- paths and headers ------------------------------------------------------------------------------------

PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def percent(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


def escaped(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def path_values(real: Sequence[str]) -> st.SearchStrategy[str]:
    """An already-encoded path segment: a real id half the time, else ids in other spellings and junk."""
    ids = st.sampled_from(real)
    other = st.one_of(
        st.uuids().map(str),
        ids.map(str.upper),
        ids.map(lambda i: i.replace("-", "")),
        ids.map(lambda i: "{" + i + "}"),
        ids.map(lambda i: "urn:uuid:" + i),
        ids.map(lambda i: i + "%00"),
        ids.map(lambda i: i + "%0A"),
        ids.map(lambda i: i + "%2F.."),
        ids.map(lambda i: i + "%FF"),
        short_texts().map(escaped),
        st.binary(max_size=40).map(percent),
        st.sampled_from(("%00", "%FF%FE", "..", "%2E%2E", "%2F", "null", "0", "-1", "x" * 3000, CANARY * 60)),
    )
    return st.one_of(ids, other)


def header_values(plausible_values: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str | None]:
    """A header's value as a client can send it (no control characters: those are the HTTP parser's to
    refuse, before the application sees anything), or no header at all."""
    sendable = st.characters(min_codepoint=0x20, exclude_categories=("Cs", "Cc"))
    junk_text = st.one_of(
        st.text(sendable, max_size=30).map(lambda t: t + CANARY),
        st.text(sendable, min_size=500, max_size=4000),
        st.sampled_from(("", " ", CANARY, "é" * 20, "\U0001f600" * 5 + CANARY)),
    )
    options: list[st.SearchStrategy[str | None]] = [st.none(), junk_text]
    if plausible_values is not None:
        options += [plausible_values, plausible_values]
    return st.one_of(*options)


def standard_webhook_headers(secret: str, body: bytes, msg_id: str, at: int) -> dict[str, str]:
    """Standard Webhooks signature headers computed here from the spec, not with the service's code:
    `v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the base64 key after `whsec_`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{at}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(at),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


# -- one request -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fuzz:
    """How a route is fuzzed, besides what the route table says (path, body schema, query parameters).

    `callers`: the identities that mostly call it (the ones that get furthest); `ids`: which of the world's
    ids each path parameter names; `headers`: request headers the handler reads, with plausible values;
    `signed`: the body is signed as a Standard Webhooks reply with the endpoint's inbound secret;
    `claims`: some tokens are signed by the trusted portal with claims of any value; `seeds`: bodies the
    route accepts in the world (the fuzzed ones start from these), where plausible fields alone rarely
    make one (consents, whose fields depend on one another)."""

    callers: tuple[str, ...]
    ids: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, Callable[[World], st.SearchStrategy[str]]] = field(default_factory=dict)
    signed: bool = False
    claims: bool = False
    seeds: Callable[[World], Sequence[Mapping[str, Any]]] | None = None


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, percent-encoded as sent
    headers: dict[str, str]
    body: bytes
    content_type: str | None

    def describe(self) -> str:
        shown = self.body[:300] + (b"..." if len(self.body) > 300 else b"")
        headers = {k: (v[:120] + "..." if len(v) > 120 else v) for k, v in self.headers.items() if k != "Authorization"}
        return f"{self.method} {self.target[:500]} content-type={self.content_type!r} headers={headers} body={shown!r}"


CONTENT_TYPES = (
    "application/json",
    "application/json",
    "application/json",
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "APPLICATION/JSON",
    "application/problem+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; boundary=",
    "*/*",
    None,
)


# What a request gets wrong: mostly one thing, so that everything else about it is right and the wrong
# part is what the service has to deal with; now and then nothing (it should succeed) or everything.
ASPECTS = ("path", "query", "body", "content-type", "headers", "auth")
FOCUS = st.sampled_from(("nothing", *ASPECTS, *ASPECTS, "everything"))


def requests(
    route: Route,
    fuzz: Fuzz,
    world: World,
    auth: Callable[[str, Mapping[str, Any]], dict[str, str]],
    identities: Sequence[str],
) -> st.SearchStrategy[Request]:
    """Requests to `route`: its path parameters, query, body and headers, one of them (or none, or all)
    fuzzed, the others plausible. `auth(who, claims)`: the Authorization header of a token for `who`, with
    `claims` changed (None: left out)."""
    params = PATH_PARAM.findall(route.path)
    real = {name: [world.ids[fuzz.ids[name]]] if name in fuzz.ids else world.uuids for name in params}
    segments = {
        False: {name: st.sampled_from(ids) for name, ids in real.items()},
        True: {name: path_values(ids) for name, ids in real.items()},
    }
    names, values, seeds = list(route.query_names), query_params(world), fuzz.seeds(world) if fuzz.seeds else ()
    query = {fuzzed: query_string(names, values, fuzzed=fuzzed) for fuzzed in (False, True)}
    body = {fuzzed: body_bytes(route.body, field_values(world), seeds, fuzzed=fuzzed) for fuzzed in (False, True)}
    callers = st.sampled_from(fuzz.callers)
    tokens = [st.one_of(callers, st.sampled_from(identities)).map(lambda who: auth(who, {}))] * 4
    if fuzz.claims:
        tokens += [st.builds(auth, callers, claim_changes())] * 4
    authorization = {
        False: callers.map(lambda who: auth(who, {})),
        True: st.one_of(
            *tokens,
            st.sampled_from(({}, {"Authorization": "Bearer " + CANARY}, {"Authorization": "Basic " + CANARY})),
        ),
    }
    headers = {
        False: {name: st.none() | make(world) for name, make in fuzz.headers.items()},
        True: {name: header_values(make(world)) for name, make in fuzz.headers.items()},
    }
    request_ids = {False: st.none(), True: st.one_of(st.none(), st.just("fuzz-request-0001"), st.text(max_size=70))}
    content_types = {False: st.just("application/json"), True: st.sampled_from(CONTENT_TYPES)}

    @st.composite
    def build(draw: st.DrawFn) -> Request:
        focus = draw(FOCUS, label="focus")

        def fuzzed(aspect: str) -> bool:
            return focus in (aspect, "everything")

        path = route.path
        for name in params:
            path = path.replace("{" + name + "}", draw(segments[fuzzed("path")][name], label=name), 1)
        raw_query = draw(query[fuzzed("query")], label="query")
        target = path + ("?" + raw_query if raw_query else "")
        # Longer request lines are the HTTP parser's to refuse (a plain 400), before the application.
        assume(len(target) <= 8000)
        sent = draw(body[fuzzed("body")], label="body")
        sending = dict(draw(authorization[fuzzed("auth")], label="authorization"))
        for name, strategy in headers[fuzzed("headers")].items():
            value = draw(strategy, label=name)
            if value is not None:
                sending[name] = value
        incoming_id = draw(request_ids[fuzzed("headers")], label="X-Request-Id")
        if incoming_id is not None and incoming_id.isprintable():
            sending["X-Request-Id"] = incoming_id
        content_type = draw(content_types[fuzzed("content-type")], label="content-type")
        if fuzz.signed:
            sending.update(draw(_webhook_headers(world, sent, fuzzed("headers")), label="webhook headers"))
        return Request(route.method, target, sending, sent, content_type)

    return build()


def claim_changes() -> st.SearchStrategy[dict[str, Any]]:
    """Claims of a token, changed: any registered or Bedside claim (or an unknown one) of any JSON value,
    or left out (None)."""
    names = st.sampled_from(("iss", "sub", "aud", "exp", "iat", "nbf", "tid", "role", "act_for", "jti", CANARY))
    values = st.recursive(
        st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.floats() | short_texts(),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(short_texts(), children, max_size=3),
        max_leaves=5,
    )
    return st.dictionaries(names, values, min_size=1, max_size=3)


def _webhook_headers(world: World, body: bytes, fuzzed: bool) -> st.SearchStrategy[dict[str, str]]:
    """A valid signature of exactly these bytes (so the body is parsed); when `fuzzed`, often a broken one."""
    now = int(time.time())
    if not fuzzed:
        return st.uuids().map(lambda u: standard_webhook_headers(world.inbound_secret, body, f"msg_{u.hex}", now))
    msg_ids = st.one_of(
        st.uuids().map(lambda u: f"msg_{u.hex}"),
        st.sampled_from(("", "a" * 257, "msg_" + CANARY, "msg id", "msg/1", "é")),
    )
    stamps = st.one_of(
        st.just(now),
        st.just(now),
        st.sampled_from((now - 301, now + 301, 0, -1, 2**63, 10**30)),
    )
    signed = st.builds(
        lambda i, at: (
            standard_webhook_headers(world.inbound_secret, body, i, at)
            if re.fullmatch(r"[A-Za-z0-9_-]{1,256}", i) and 0 <= at < 2**40
            else {"webhook-id": i, "webhook-timestamp": str(at), "webhook-signature": "v1,AAAA"}
        ),
        msg_ids,
        stamps,
    )
    broken = st.fixed_dictionaries(
        {},
        optional={
            "webhook-id": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
            "webhook-timestamp": int_strings().filter(lambda s: s.isprintable() and s.strip() == s),
            "webhook-signature": st.sampled_from(("v1,", "v1," + "A" * 44, "v2,x", "v1a,AAAA", CANARY, "v1,===")),
        },
    )
    return st.one_of(signed, broken)
