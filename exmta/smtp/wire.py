"""Sans-IO ESMTP framing for the server side, and the dot-stuffer for clients.

Bytes go in with :meth:`ServerParser.feed`; events come out one at a time
from :meth:`ServerParser.next_event`. The parser never looks past the event
it returns, so the protocol decides what the next bytes mean (a command, DATA
content, a BDAT chunk) before they are parsed: this is what makes pipelining,
BDAT and the STARTTLS buffer purge safe.

Framing is strict: a command line or a DATA line ends only at CRLF, and DATA
ends only at CRLF "." CRLF (where the first CRLF may be the one that ended
the DATA command). Bare LF and bare CR inside DATA are either recorded so
the transaction can be refused at end of data ("reject") or turned into CRLF
("normalize"); in neither case can they end DATA (SMTP smuggling,
CVE-2023-51764 class). Content is delivered in chunks, never as a whole
message.

No Twisted imports here: this module is fuzzed with Hypothesis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "BareNewlinePolicy", "ChunkEnd", "Command", "DataChunk", "DataEnd", "DotStuffer",
    "Event", "InvalidLine", "Mode", "ServerParser", "dot_stuff", "INVALID_BARE_NEWLINE",
    "INVALID_ENCODING", "INVALID_NUL", "INVALID_TOO_LONG",
]

CRLF = b"\r\n"
_NEWLINE = re.compile(rb"[\r\n]")
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
#: octets of DATA content the bulk path (ServerParser._plain_run) looks at in one step
_RUN_WINDOW = 16 * 1024

# reasons carried by InvalidLine
INVALID_TOO_LONG = "too_long"
INVALID_BARE_NEWLINE = "bare_newline"
INVALID_NUL = "nul"
INVALID_ENCODING = "encoding"

#: most bytes handed out in one DataChunk (bounds memory per event)
MAX_CHUNK = 64 * 1024
#: how much of an invalid line is kept in its event, for logs
_RAW_KEEP = 64


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Command:
    """One command line. ``verb`` is upper case; ``argument`` is the rest after one space."""

    verb: str
    argument: str
    raw: bytes  # the line without its CRLF


@dataclass(frozen=True)
class InvalidLine:
    """A command line that cannot be parsed: too long, bare CR/LF inside, NUL, bad UTF-8."""

    reason: str
    raw: bytes  # at most the first 64 octets


@dataclass(frozen=True)
class DataChunk:
    """Message content: dot-unstuffed (DATA) or verbatim (BDAT), CRLF line ends."""

    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """DATA ended with CRLF.CRLF. Flags say why the transaction must fail, if it must."""

    size: int               # octets of content seen (also beyond the size limit)
    oversize: bool = False  # more than max_message_size: content past it was dropped
    bare_newline: bool = False
    line_too_long: bool = False


@dataclass(frozen=True)
class ChunkEnd:
    """The octets announced by a BDAT command have all arrived."""

    size: int               # octets of the message so far, over every chunk
    oversize: bool = False


Event = Command | InvalidLine | DataChunk | DataEnd | ChunkEnd


class Mode(Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"


class BareNewlinePolicy(Enum):
    REJECT = "reject"
    NORMALIZE = "normalize"


# ---------------------------------------------------------------- server parser


class ServerParser:
    """Incremental server-side parser. Pull events with :meth:`next_event`.

    ``max_message_size`` 0 means no limit; the parser counts content octets
    across DATA or all the BDAT chunks of one message (reset with
    :meth:`begin_message`) and drops content past the limit while still
    consuming it, so the stream stays in sync.
    """

    def __init__(
        self,
        max_command_line: int = 512,
        max_text_line: int = 1000,
        bare_newline: BareNewlinePolicy | str = BareNewlinePolicy.REJECT,
        max_message_size: int = 0,
        parameter_allowance: int = 0,
    ) -> None:
        if max_command_line < 3:
            raise ValueError("max_command_line must leave room for CRLF")
        self.max_command_line = max_command_line
        # MAIL and RCPT may be longer by what the advertised extensions add
        # (RFC 1870 SIZE 26, RFC 3461 RET/ENVID 100 and NOTIFY/ORCPT 500, RFC 4954 AUTH 500)
        self.parameter_allowance = parameter_allowance
        self.max_text_line = max_text_line
        self.bare_newline = BareNewlinePolicy(bare_newline)
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._mode = Mode.COMMAND
        self._skipping = False       # inside an overlong command line, until CRLF
        self._pending: list[Event] = []
        # per message
        self._size = 0
        self._oversize = False
        # per DATA
        self._line_start = True
        self._line_len = 0
        self._bare = False
        self._long = False
        # per BDAT chunk
        self._chunk_left = 0

    # -- state the protocol drives

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def message_size(self) -> int:
        return self._size

    def feed(self, data: bytes) -> None:
        """Append received bytes; nothing is parsed until :meth:`next_event`."""
        self._buf += data

    def buffered(self) -> int:
        """Octets received but not yet turned into events."""
        return len(self._buf)

    def discard_buffer(self) -> int:
        """Drop every unparsed byte (STARTTLS: no plaintext may survive). Returns the count."""
        n = len(self._buf)
        self._buf.clear()
        self._pending.clear()
        self._skipping = False
        self._mode = Mode.COMMAND
        return n

    def begin_message(self) -> None:
        """Reset the size count: a new message starts (DATA, or the first BDAT)."""
        self._size = 0
        self._oversize = False

    def start_data(self) -> None:
        """Switch to DATA content after the 354 reply."""
        if self._mode is not Mode.COMMAND:
            raise RuntimeError(f"start_data in {self._mode} mode")
        self._mode = Mode.DATA
        self._line_start = True
        self._line_len = 0
        self._bare = False
        self._long = False

    def start_bdat(self, octets: int) -> None:
        """Consume the next ``octets`` bytes as one BDAT chunk (even when the command was refused)."""
        if self._mode is not Mode.COMMAND:
            raise RuntimeError(f"start_bdat in {self._mode} mode")
        if octets < 0:
            raise ValueError("negative chunk size")
        self._mode = Mode.BDAT
        self._chunk_left = octets

    # -- events

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        if self._pending:
            return self._pending.pop(0)
        if self._mode is Mode.COMMAND:
            return self._next_command()
        if self._mode is Mode.DATA:
            self._parse_data()
        else:
            self._parse_bdat()
        if self._pending:
            return self._pending.pop(0)
        return None

    # -- command mode

    def _next_command(self) -> Event | None:
        buf = self._buf
        base = self.max_command_line
        limit = base + self.parameter_allowance
        while True:
            if self._skipping:
                end = buf.find(CRLF)
                if end < 0:
                    # keep a trailing CR: it may be the first half of the CRLF
                    keep = 1 if buf.endswith(b"\r") else 0
                    del buf[: len(buf) - keep]
                    return None
                del buf[: end + 2]
                self._skipping = False
                continue
            # a line of limit octets including CRLF ends at index limit - 2 at the latest
            end = buf.find(CRLF, 0, limit)
            if end < 0:
                if len(buf) < limit:
                    return None
                raw = bytes(buf[:_RAW_KEEP])
                self._skipping = True
                return InvalidLine(INVALID_TOO_LONG, raw)
            line = bytes(buf[:end])
            del buf[: end + 2]
            if end + 2 > base and line[:5].upper() not in (b"MAIL ", b"RCPT "):
                return InvalidLine(INVALID_TOO_LONG, line[:_RAW_KEEP])
            return _parse_command(line)

    # -- DATA mode

    def _emit_content(self, out: bytearray) -> None:
        """Count content and queue it unless the message is already over the size limit."""
        if not out:
            return
        n = len(out)
        limit = self.max_message_size
        if limit and not self._oversize and self._size + n > limit:
            self._oversize = True
        self._size += n
        if not self._oversize:
            if n <= MAX_CHUNK:
                self._pending.append(DataChunk(bytes(out)))  # one copy, not a slice and then a copy
                return
            with memoryview(out) as view:
                for i in range(0, n, MAX_CHUNK):
                    self._pending.append(DataChunk(bytes(view[i:i + MAX_CHUNK])))

    def _parse_data(self) -> None:
        buf = self._buf
        n = len(buf)
        i = 0
        out = bytearray()
        normalize = self.bare_newline is BareNewlinePolicy.NORMALIZE
        max_line = self.max_text_line
        ended = False
        # _plain_run's findings: next CRLF ".", next bare CR/LF (-1: none seen yet), lines checked
        # for length up to here, starts of overlong lines, lines counted for bare CR/LF up to here
        run_state: list[Any] = [-1, -1, 0, [], 0]
        while i < n:
            if self._line_start:
                # only after a real CRLF (or the DATA command): end marker or dot-stuffing
                if buf[i] == 0x2E:  # "."
                    if n - i < 3:
                        break  # need ".\r\n" or proof it is not
                    if buf[i + 1] == 0x0D and buf[i + 2] == 0x0A:
                        i += 3
                        ended = True
                        break
                    i += 1  # unstuff
                else:
                    k = self._plain_run(buf, i, run_state)
                    if k > i:
                        out += buf[i:k]
                        i = k
                        continue  # at a line start again
                self._line_start = False
                continue
            m = _NEWLINE.search(buf, i)
            if m is None:
                out += buf[i:]
                self._line_len += n - i
                i = n
                break
            j = m.start()
            out += buf[i:j]
            self._line_len += j - i
            if buf[j] == 0x0D:
                if j + 1 >= n:
                    i = j  # a lone CR at the end: wait for the next byte
                    break
                if buf[j + 1] == 0x0A:
                    out += CRLF
                    self._end_line()
                    self._line_start = True
                    i = j + 2
                    continue
            # a bare CR or a bare LF
            if normalize:
                out += CRLF
                self._end_line()
            else:
                self._bare = True
                out.append(buf[j])
                self._line_len += 1
            i = j + 1
        del buf[:i]
        self._emit_content(out)
        if max_line and self._line_len + 2 > max_line:
            self._long = True
        if ended:
            self._mode = Mode.COMMAND
            self._pending.append(DataEnd(self._size, self._oversize, self._bare, self._long))

    def _plain_run(self, buf: bytearray, i: int, st: list[Any]) -> int:
        """End of the run of whole ordinary lines starting at line start ``i`` (``i`` when none).

        Ordinary: ends with CRLF, no bare CR or LF, not too long, the next
        line does not start with a dot. Such lines are copied as they are,
        with C-speed scans instead of the per-line loop, which handles the
        rest. ``st`` (one per _parse_data call) remembers what
        the scans found further on, so every octet is scanned a bounded
        number of times whatever the content.
        """
        last = buf.rfind(CRLF, i, i + _RUN_WINDOW)
        if last < 0:
            return i
        end = last + 2
        dot = st[0]
        if dot < i:  # the next CRLF "." (a dot line starts after it)
            dot = buf.find(b"\r\n.", i)
            st[0] = dot = len(buf) if dot < 0 else dot
        if dot + 2 < end:
            end = dot + 2
        b = st[1]
        if b == -1 and st[4] < end:  # no bare CR/LF seen so far: checking is cheaper than searching
            if not only_crlf_newlines(buf[max(i, st[4]):end]):
                b = -2  # there is one: locate it
            st[4] = end
        if b == -2 or 0 <= b < i:
            m = _BARE_NEWLINE.search(buf, i)
            b = m.start() if m else len(buf)
        st[1] = b
        if 0 <= b < end:
            end = buf.rfind(CRLF, i, b) + 2  # the start of the line with the bare newline
            if end < i + 2:
                return i
        limit = self.max_text_line
        if limit:
            longs: list[int] = st[3]  # starts of overlong lines found, ascending
            if st[2] < end:  # lines from max(i, st[2]) to end not checked yet
                start = max(i, st[2])
                lines = [] if _lf_in_every_block(buf, start, end, limit // 2) else buf[start:end].split(CRLF)
                if lines and max(map(len, lines)) > limit - 2:
                    pos = start
                    for line in lines:
                        if len(line) > limit - 2:
                            longs.append(pos)
                        pos += len(line) + 2
                st[2] = end
            while longs and longs[0] < i:
                longs.pop(0)
            if longs and longs[0] < end:
                end = longs[0]
        return end

    def _end_line(self) -> None:
        max_line = self.max_text_line
        if max_line and self._line_len + 2 > max_line:
            self._long = True
        self._line_len = 0

    # -- BDAT mode

    def _parse_bdat(self) -> None:
        buf = self._buf
        take = min(len(buf), self._chunk_left)
        if take:
            out = bytearray(buf[:take])
            del buf[:take]
            self._chunk_left -= take
            self._emit_content(out)
        if self._chunk_left == 0:
            self._mode = Mode.COMMAND
            self._pending.append(ChunkEnd(self._size, self._oversize))


_CR_MARKS = bytes(1 if b == 0x0D else 0 for b in range(256))
_LF_MARKS = bytes(1 if b == 0x0A else 0 for b in range(256))


def only_crlf_newlines(data: bytes | bytearray) -> bool:
    """True when every CR in ``data`` is followed by LF and every LF follows a CR.

    Compares where the CRs are with where the LFs are, one octet later: two
    translate() calls and a memcmp, 70 us per 64 KiB where counting CRLF, CR
    and LF took 104 (it runs on every octet a delivery sends).
    """
    if data[:1] == b"\n" or data[-1:] == b"\r":
        return False
    return data[:-1].translate(_CR_MARKS) == data[1:].translate(_LF_MARKS)


def _lf_in_every_block(buf: bytearray, start: int, end: int, step: int) -> bool:
    """True when every ``step``-octet block of buf[start:end] (from start) holds an LF.

    Then no stretch of 2 * ``step`` octets is free of LF, so no line there is
    ``2 * step`` octets or longer: with ``step = max_text_line // 2`` it proves
    that no line is too long, with a few memchr calls instead of splitting the
    text into a list of lines (65 us per 64 KiB). False: look line by line.
    """
    if step < 1:
        return False
    find = buf.find
    for s in range(start, end - step + 1, step):
        if find(b"\n", s, s + step) < 0:
            return False
    return True


def _parse_command(line: bytes) -> Command | InvalidLine:
    raw = line[:_RAW_KEEP]
    if b"\n" in line or b"\r" in line:
        return InvalidLine(INVALID_BARE_NEWLINE, raw)
    if b"\x00" in line:
        return InvalidLine(INVALID_NUL, raw)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidLine(INVALID_ENCODING, raw)
    verb, _, argument = text.partition(" ")
    return Command(verb.upper(), argument, line)


# ---------------------------------------------------------------- client side: dot-stuffing


class DotStuffer:
    """Streaming dot-stuffer (RFC 5321 4.5.2) that carries its state across chunks.

    The one DATA transform for both sides: the client streams spooled
    content through it, tests build wire bodies with it. ``feed`` may be
    called with chunks cut anywhere, even between CR and LF, and the output
    does not depend on the cuts; ``finish`` returns the rest plus the
    end-of-data marker. With ``normalize_newlines`` (the default) bare CR and
    bare LF become CRLF (a lone ``\\n.\\n`` never reaches the wire: no
    smuggling through us); a CR at a chunk end is held back until the next
    chunk shows whether an LF follows.
    """

    def __init__(self, normalize_newlines: bool = True) -> None:
        self.normalize_newlines = normalize_newlines
        self._tail = CRLF        # last (up to) two output bytes; start counts as a line start
        self._pending_cr = False  # normalize: a CR at a chunk end, not yet known to be bare
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        if self._finished:
            raise RuntimeError("feed after finish")
        data = bytes(chunk)
        if self.normalize_newlines:
            if self._pending_cr:
                data = b"\r" + data
                self._pending_cr = False
            if data.endswith(b"\r"):
                data = data[:-1]
                self._pending_cr = True
            if not only_crlf_newlines(data):
                data = _ANY_NEWLINE.sub(CRLF, data)
        if not data:
            return b""
        tail = self._tail
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if tail == CRLF:
            if stuffed[:1] == b".":
                stuffed = b"." + stuffed
        elif tail[-1:] == b"\r" and stuffed[:2] == b"\n.":  # only without normalizing: CR|LF. split
            stuffed = b"\n." + stuffed[1:]
        self._tail = stuffed[-2:] if len(stuffed) >= 2 else (tail + stuffed)[-2:]
        return stuffed

    def finish(self) -> bytes:
        """The pending bytes and the terminator: ``.CRLF`` after a line end, else ``CRLF.CRLF``."""
        out = b""
        if self._pending_cr:
            self._pending_cr = False
            out = CRLF  # a trailing CR is bare: it becomes CRLF
            self._tail = CRLF
        self._finished = True
        if self._tail == CRLF:
            return out + b".\r\n"
        return out + b"\r\n.\r\n"


def dot_stuff(data: bytes, normalize_newlines: bool = True) -> bytes:
    """Stuff a whole message and append the end-of-data marker."""
    stuffer = DotStuffer(normalize_newlines)
    return stuffer.feed(data) + stuffer.finish()
