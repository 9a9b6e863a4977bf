"""The milter protocol (version 6), sans I/O: command encoders and an incremental reply parser.

A milter packet is a 4-octet length in network order (counting the
command octet), one command octet and the command's data. The MTA sends
commands (``SMFIC_*``) and the milter answers with replies (``SMFIR_*``).
Nothing here touches a socket or a clock: :mod:`exmta.milter.client`
carries the bytes and the timeouts.

Every packet the parser accepts is bounded (``max_packet``): a milter that
announces a larger packet, a zero-length one, an unknown reply or a reply
whose data does not parse raises :class:`MilterProtocolError`, and the
caller ends the conversation with the milter's default action.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = [
    "ACTIONS_OFFERED", "BODY_CHUNK", "MAX_PACKET", "MilterProtocolError", "Negotiated", "PROTOCOL_OFFERED",
    "Reply", "ReplyParser", "STAGES", "VERSION", "encode",
]

VERSION = 6
#: the largest body chunk the MTA sends (libmilter's MILTER_CHUNK_SIZE)
BODY_CHUNK = 65535
#: the largest reply packet accepted (a body replacement chunk is at most 64 KiB without the MDS flags)
MAX_PACKET = 1024 * 1024

# ------------------------------------------------------------------ commands (MTA -> milter)
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# ------------------------------------------------------------------ replies (milter -> MTA)
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"

# ------------------------------------------------------------------ actions a milter may take (SMFIF_*)
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

#: what exmta can carry out through the core (no CHGFROM: the envelope sender is not editable)
ACTIONS_OFFERED = (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS
                   | SMFIF_QUARANTINE | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)

# ------------------------------------------------------------------ protocol steps (SMFIP_*)
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

#: the steps a milter may leave out or answer without a reply; exmta sends no UNKNOWN commands and
#: no rejected recipients, and keeps the space after a header's colon its own (no HDR_LEADSPC)
PROTOCOL_OFFERED = (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
                    | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_SKIP
                    | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA
                    | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY)

#: macro stages (SMFIM_*) by the name the configuration uses, and the command each precedes
STAGES: dict[str, tuple[int, bytes]] = {
    "connect": (0, SMFIC_CONNECT),
    "helo": (1, SMFIC_HELO),
    "mail": (2, SMFIC_MAIL),
    "rcpt": (3, SMFIC_RCPT),
    "data": (4, SMFIC_DATA),
    "eom": (5, SMFIC_BODYEOB),
    "eoh": (6, SMFIC_EOH),
}
_STAGE_BY_NUMBER = {number: name for name, (number, _) in STAGES.items()}

#: (skip flag, no-reply flag) per stage: which SMFIP bits leave a step out or make it unanswered
STEP_FLAGS: dict[str, tuple[int, int]] = {
    "connect": (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    "helo": (SMFIP_NOHELO, SMFIP_NR_HELO),
    "mail": (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    "rcpt": (SMFIP_NORCPT, SMFIP_NR_RCPT),
    "data": (SMFIP_NODATA, SMFIP_NR_DATA),
    "header": (SMFIP_NOHDRS, SMFIP_NR_HDR),
    "eoh": (SMFIP_NOEOH, SMFIP_NR_EOH),
    "body": (SMFIP_NOBODY, SMFIP_NR_BODY),
}


class MilterProtocolError(Exception):
    """The milter sent something the protocol does not allow (too big, unknown, malformed)."""


# ------------------------------------------------------------------ encoding


def encode(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command octet, data."""
    if len(command) != 1:
        raise ValueError("a milter command is one octet")
    return struct.pack("!I", len(data) + 1) + command + data


def _z(text: str | bytes) -> bytes:
    """A NUL-terminated string (a NUL inside would cut it short, so it is refused)."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    if b"\0" in raw:
        raise ValueError("milter strings cannot contain NUL")
    return raw + b"\0"


def optneg(version: int = VERSION, actions: int = ACTIONS_OFFERED, protocol: int = PROTOCOL_OFFERED) -> bytes:
    return encode(SMFIC_OPTNEG, struct.pack("!III", version, actions, protocol))


def macros(stage: str, values: Mapping[str, str]) -> bytes:
    """SMFIC_MACRO for the command of ``stage``: name/value pairs (``{name}`` braces as given)."""
    command = STAGES[stage][1]
    return encode(SMFIC_MACRO, command + b"".join(_z(k) + _z(v) for k, v in values.items()))


def connect(hostname: str, family: str, port: int, address: str) -> bytes:
    """``family``: "4", "6", "L" (Unix socket) or "U" (unknown: no port or address follow)."""
    if family == "U":
        return encode(SMFIC_CONNECT, _z(hostname) + b"U")
    return encode(SMFIC_CONNECT, _z(hostname) + family.encode("ascii") + struct.pack("!H", port) + _z(address))


def helo(name: str) -> bytes:
    return encode(SMFIC_HELO, _z(name))


def mail(sender: str, args: Sequence[str] = ()) -> bytes:
    return encode(SMFIC_MAIL, _z(sender) + b"".join(_z(a) for a in args))


def rcpt(recipient: str, args: Sequence[str] = ()) -> bytes:
    return encode(SMFIC_RCPT, _z(recipient) + b"".join(_z(a) for a in args))


def data() -> bytes:
    return encode(SMFIC_DATA)


def header(name: str | bytes, value: str | bytes) -> bytes:
    return encode(SMFIC_HEADER, _z(name) + _z(value))


def eoh() -> bytes:
    return encode(SMFIC_EOH)


def body(chunk: bytes) -> bytes:
    if len(chunk) > BODY_CHUNK:
        raise ValueError(f"a body chunk is at most {BODY_CHUNK} octets")
    return encode(SMFIC_BODY, chunk)


def body_chunks(content: bytes) -> Iterable[bytes]:
    """The body as SMFIC_BODY packets."""
    for start in range(0, len(content), BODY_CHUNK):
        yield body(content[start:start + BODY_CHUNK])


def end_of_message() -> bytes:
    return encode(SMFIC_BODYEOB)


def abort() -> bytes:
    return encode(SMFIC_ABORT)


def quit() -> bytes:
    return encode(SMFIC_QUIT)


def quit_new_connection() -> bytes:
    return encode(SMFIC_QUIT_NC)


def unknown(command: str) -> bytes:
    return encode(SMFIC_UNKNOWN, _z(command))


# ------------------------------------------------------------------ replies


@dataclass(frozen=True)
class Reply:
    """One reply from the milter.

    ``kind`` is the reply's name (below); the other fields are set by the kinds that carry them:

    * ``optneg``: version, actions, protocol, macros ({stage name: [macro names]})
    * ``accept``, ``continue``, ``discard``, ``reject``, ``tempfail``, ``progress``, ``skip``,
      ``conn_fail``, ``shutdown``: nothing
    * ``replycode``: code (int), text (the whole reply, e.g. "550 5.7.1 No")
    * ``addheader``: name, value; ``insheader`` / ``chgheader``: index, name, value
    * ``addrcpt``: address; ``addrcpt_par``: address, args; ``delrcpt``: address
    * ``chgfrom``: address, args; ``replbody``: body (one chunk); ``quarantine``: text
    * ``setsymlist``: stage, names
    """

    kind: str
    version: int = 0
    actions: int = 0
    protocol: int = 0
    macros: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    code: int = 0
    text: str = ""
    index: int = 0
    name: str = ""
    value: str = ""
    address: str = ""
    args: tuple[str, ...] = ()
    body: bytes = b""
    stage: str = ""
    names: tuple[str, ...] = ()

    @property
    def is_modification(self) -> bool:
        return self.kind in MODIFICATIONS


#: the replies allowed only at end of message, and the action bit each needs
MODIFICATIONS: dict[str, int] = {
    "addheader": SMFIF_ADDHDRS,
    "insheader": SMFIF_ADDHDRS,
    "chgheader": SMFIF_CHGHDRS,
    "replbody": SMFIF_CHGBODY,
    "addrcpt": SMFIF_ADDRCPT,
    "addrcpt_par": SMFIF_ADDRCPT_PAR,
    "delrcpt": SMFIF_DELRCPT,
    "quarantine": SMFIF_QUARANTINE,
    "chgfrom": SMFIF_CHGFROM,
}

_SIMPLE = {
    SMFIR_ACCEPT: "accept", SMFIR_CONTINUE: "continue", SMFIR_DISCARD: "discard", SMFIR_REJECT: "reject",
    SMFIR_TEMPFAIL: "tempfail", SMFIR_PROGRESS: "progress", SMFIR_SKIP: "skip", SMFIR_CONN_FAIL: "conn_fail",
    SMFIR_SHUTDOWN: "shutdown",
}


def _strings(data: bytes, count: int | None, what: str) -> list[str]:
    """NUL-terminated strings; exactly ``count`` of them (or at least one when None)."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string not NUL-terminated")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise MilterProtocolError(f"{what}: {len(parts)} string(s), expected {count}")
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _index(data: bytes, what: str) -> tuple[int, bytes]:
    if len(data) < 4:
        raise MilterProtocolError(f"{what}: too short for an index")
    return struct.unpack("!I", data[:4])[0], data[4:]


def _reply_code(text: str) -> Reply:
    """SMFIR_REPLYCODE: "4xx"/"5xx", a space or a hyphen, then text (multi-line allowed)."""
    first = text.split("\r\n", 1)[0]
    if len(first) < 3 or not first[:3].isdigit() or first[0] not in "45" or first[3:4] not in (" ", "-", ""):
        raise MilterProtocolError(f"replycode: not a 4xx or 5xx reply: {first[:40]!r}")
    return Reply("replycode", code=int(first[:3]), text=text)


def _optneg(data: bytes) -> Reply:
    if len(data) < 12:
        raise MilterProtocolError("optneg: shorter than 12 octets")
    version, actions, protocol = struct.unpack("!III", data[:12])
    rest = data[12:]
    wanted: dict[str, tuple[str, ...]] = {}
    while rest:  # (stage, "space separated macro names\0") pairs the milter asks for
        if len(rest) < 5:
            raise MilterProtocolError("optneg: truncated macro list")
        number = struct.unpack("!I", rest[:4])[0]
        end = rest.find(b"\0", 4)
        if end < 0:
            raise MilterProtocolError("optneg: macro list not NUL-terminated")
        stage = _STAGE_BY_NUMBER.get(number)
        if stage is None:
            raise MilterProtocolError(f"optneg: unknown macro stage {number}")
        wanted[stage] = tuple(rest[4:end].decode("ascii", "replace").replace(",", " ").split())
        rest = rest[end + 1:]
    return Reply("optneg", version=version, actions=actions, protocol=protocol, macros=wanted)


def parse_reply(command: bytes, data: bytes) -> Reply:
    """One reply packet's command octet and data -> a Reply (MilterProtocolError when it does not parse)."""
    kind = _SIMPLE.get(command)
    if kind is not None:
        if data:
            raise MilterProtocolError(f"{kind}: unexpected data")
        return Reply(kind)
    if command == SMFIR_OPTNEG:
        return _optneg(data)
    if command == SMFIR_REPLYCODE:
        return _reply_code(_strings(data, 1, "replycode")[0])
    if command == SMFIR_ADDHEADER:
        name, value = _strings(data, 2, "addheader")
        return Reply("addheader", name=_field_name(name), value=value)
    if command in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        kind = "insheader" if command == SMFIR_INSHEADER else "chgheader"
        index, rest = _index(data, kind)
        name, value = _strings(rest, 2, kind)
        return Reply(kind, index=index, name=_field_name(name), value=value)
    if command == SMFIR_ADDRCPT:
        return Reply("addrcpt", address=_strings(data, 1, "addrcpt")[0])
    if command == SMFIR_DELRCPT:
        return Reply("delrcpt", address=_strings(data, 1, "delrcpt")[0])
    if command in (SMFIR_ADDRCPT_PAR, SMFIR_CHGFROM):
        kind = "addrcpt_par" if command == SMFIR_ADDRCPT_PAR else "chgfrom"
        parts = _strings(data, None, kind)
        args = tuple(a for arg in parts[1:] for a in arg.split())
        return Reply(kind, address=parts[0], args=args)
    if command == SMFIR_REPLBODY:
        return Reply("replbody", body=data)
    if command == SMFIR_QUARANTINE:
        return Reply("quarantine", text=_strings(data, 1, "quarantine")[0])
    if command == SMFIR_SETSYMLIST:
        number, rest = _index(data, "setsymlist")
        stage = _STAGE_BY_NUMBER.get(number)
        if stage is None:
            raise MilterProtocolError(f"setsymlist: unknown stage {number}")
        return Reply("setsymlist", stage=stage, names=tuple(_strings(rest, 1, "setsymlist")[0].split()))
    raise MilterProtocolError(f"unknown reply {command!r}")


def _field_name(name: str) -> str:
    if not name or any(not ("!" <= c <= "~") or c == ":" for c in name):
        raise MilterProtocolError(f"bad header name {name[:40]!r}")
    return name


class ReplyParser:
    """Splits the milter's byte stream into Replies, each packet bounded by ``max_packet``."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by ``data`` (raises MilterProtocolError on the first bad packet)."""
        self._buffer += data
        out: list[Reply] = []
        while len(self._buffer) >= 4:
            length = struct.unpack("!I", self._buffer[:4])[0]
            if length == 0:
                raise MilterProtocolError("zero-length packet")
            if length > self.max_packet:
                raise MilterProtocolError(f"packet of {length} octets is over the limit of {self.max_packet}")
            if len(self._buffer) < 4 + length:
                break
            command = bytes(self._buffer[4:5])
            payload = bytes(self._buffer[5:4 + length])
            del self._buffer[:4 + length]
            out.append(parse_reply(command, payload))
        return out

    @property
    def pending(self) -> int:
        """Octets received that do not make a whole packet yet."""
        return len(self._buffer)


@dataclass(frozen=True)
class Negotiated:
    """What the milter agreed to in SMFIC_OPTNEG: its actions, the steps it skips or leaves unanswered."""

    version: int
    actions: int
    protocol: int
    macros: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Reply, offered_actions: int = ACTIONS_OFFERED,
                   offered_protocol: int = PROTOCOL_OFFERED) -> Negotiated:
        """Check the milter's answer against what was offered (MilterProtocolError when it asks for more)."""
        if reply.kind != "optneg":
            raise MilterProtocolError(f"expected the option negotiation, got {reply.kind}")
        if not 2 <= reply.version <= VERSION:
            raise MilterProtocolError(f"milter protocol version {reply.version} is not supported (2 to {VERSION})")
        extra = reply.protocol & ~offered_protocol & 0x0FFFFFFF  # the MDS_* size bits are ignored
        if extra:
            raise MilterProtocolError(f"milter asks for protocol steps 0x{extra:x} that were not offered")
        # actions beyond the offer are masked (as Postfix does): a milter that then uses one misbehaves
        return cls(reply.version, reply.actions & offered_actions, reply.protocol & offered_protocol,
                   dict(reply.macros))

    def sends(self, step: str) -> bool:
        """True when the MTA sends this step's command at all."""
        return not self.protocol & STEP_FLAGS[step][0]

    def answers(self, step: str) -> bool:
        """True when the milter replies to this step's command."""
        return not self.protocol & STEP_FLAGS[step][1]

    def may(self, kind: str) -> bool:
        """True when a modification reply of this kind was negotiated."""
        return bool(self.actions & MODIFICATIONS[kind])

    @property
    def skip(self) -> bool:
        return bool(self.protocol & SMFIP_SKIP)
