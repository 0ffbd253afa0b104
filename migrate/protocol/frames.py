"""Wire frames: typed dataclasses with explicit encode/decode.  No I/O.

Every frame is a 16-byte header, a msgpack map (the "meta") and an optional
raw payload::

    magic "MT" | type u8 | flags u8 | meta_len u32 | payload_len u32 | crc32 u32
    meta (msgpack map, <= MAX_META bytes)
    payload (<= MAX_PAYLOAD bytes)

All integers little-endian.  With FLAG_MAC set, a MAC_SIZE-byte message
authentication code follows the payload (not counted in payload_len): a
connection sealed with a shared key (--psk-file) sends and requires it on
every frame after the handshake; the key and the sequence number it covers
live in the connection (auth.FrameMac), not here.  With FLAG_CRC set, crc32 covers the header's
first 12 bytes, the meta and the payload, so corruption is caught at the frame
where it happens; with FLAG_CRC_META_ONLY as well it leaves the payload out:
in checksum mode "meta" (page data and tags are then proven end to end by the
completion digest, which reads both kernels' memory) and, in mode "full" (the
default), for a PAGES frame whose meta carries CRCs of its own data and tags.
Lengths are checked against the bounds before anything is allocated; field
types are checked before anything is used.

``python -m migrate.protocol.describe`` renders the frame list, the header,
the bounds and the state tables of docs/PROTOCOL.md from this module and
machine.py.
"""

import enum
import struct
from array import array
from dataclasses import dataclass, field

import msgpack

from migrate.checksum import crc32
from migrate.errors import ProtocolError

#: bumped whenever a frame changes shape; both sides must agree (HELLO)
PROTOCOL_VERSION = 10
MAGIC = b"MT"
HEADER = struct.Struct("<2sBBIII")
HEADER_SIZE = HEADER.size
FLAG_CRC = 0x01
FLAG_CRC_META_ONLY = 0x02
FLAG_MAC = 0x04
#: bytes of the MAC trailer of a FLAG_MAC frame (HMAC-SHA-256 cut to 128 bits)
MAC_SIZE = 16
#: checksum modes and their header flags
CHECKSUM_FLAGS = {"full": FLAG_CRC, "meta": FLAG_CRC | FLAG_CRC_META_ONLY, "none": 0}
CHECKSUM_MODES = tuple(CHECKSUM_FLAGS)


def checksum_mode(value) -> str:
    """A checksum mode from a name or a bool (True: "full", False: "none")."""
    if value is True or value is False:
        return "full" if value else "none"
    if value not in CHECKSUM_FLAGS:
        raise ValueError(f"checksum must be one of {', '.join(CHECKSUM_MODES)}, got {value!r}")
    return value


MAX_META = 64 * 1024
MAX_BATCH_PAGES = 1024
PAGE_SIZE = 4096
PACKED_TAGS_PER_PAGE = 128
# A batch of MAX_BATCH_PAGES pages with data and tags, plus slack for a
# compressed stream that came out larger than its input.
MAX_PAYLOAD = MAX_BATCH_PAGES * (PAGE_SIZE + PACKED_TAGS_PER_PAGE) + 64 * 1024

# Per-page flags in a Pages frame.
PAGE_ZERO = 0x01  # data is all zero: no bytes on the wire
PAGE_TAGS = 0x02  # tags are not all zero: PACKED_TAGS_PER_PAGE bytes follow
PAGE_KEEP = 0x04  # data unchanged since it was last sent: only the tags travel
VALID_PAGE_FLAGS = bytes([0, PAGE_ZERO, PAGE_TAGS, PAGE_ZERO | PAGE_TAGS, PAGE_KEEP, PAGE_KEEP | PAGE_TAGS])


class FrameType(enum.IntEnum):
    """The type byte of the header; a receiver refuses any other value."""

    HELLO = 1
    WELCOME = 2
    PAGES = 3
    PASS_END = 4
    STATE = 5
    COMPLETE = 6
    CONFIRM = 7
    INSPECT = 8
    INSPECTION = 9
    GO = 10
    RESUMED = 11
    ERROR = 12
    ABORT = 13
    JOIN = 14
    AUTH = 15
    RECOVER = 16
    POSTCOPY = 17
    REQUEST = 18
    APPLIED = 19


# -- field checking ----------------------------------------------------------
def _field(meta: dict, name: str, kind, frame: str):
    if name not in meta:
        raise ProtocolError(f"{frame} frame is missing field {name!r}")
    value = meta[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"{frame} field {name!r} must be {kinds[0].__name__}, got bool")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{frame} field {name!r} must be {kinds[0].__name__}, got {type(value).__name__}")
    return value


def _uint(meta, name, frame, limit=2**63):
    value = _field(meta, name, int, frame)
    if not 0 <= value < limit:
        raise ProtocolError(f"{frame} field {name!r} = {value} is out of range")
    return value


def _nonce(meta, frame, name="nonce"):
    value = _field(meta, name, bytes, frame)
    if len(value) > 64:
        raise ProtocolError(f"{frame} field {name!r} is longer than 64 bytes")
    return value


def _channels(meta, frame):
    n = _uint(meta, "channels", frame, Hello.MAX_CHANNELS + 1)
    if n < 1:
        raise ProtocolError(f"{frame} field 'channels' must be at least 1")
    return n


# -- frames --------------------------------------------------------------------
@dataclass
class Hello:
    """Source -> destination, the first frame of the control connection: who
    I am and what I will send.  The destination compares each capability
    with its own and refuses the first difference."""

    version: int
    ram_size: int
    page_size: int
    granule: int
    mte: bool
    vcpus: int
    strategy: str
    tag_format: str
    compression: str
    vm_uuid: str = ""
    channels: int = 1
    session: str = ""
    nonce: bytes = b""
    postcopy: bool = False  # the source may switch to postcopy: the destination needs 4 KiB pages
    type = FrameType.HELLO
    MAX_CHANNELS = 16

    def meta(self):
        return {
            "version": self.version,
            "ram_size": self.ram_size,
            "page_size": self.page_size,
            "granule": self.granule,
            "mte": self.mte,
            "vcpus": self.vcpus,
            "strategy": self.strategy,
            "tag_format": self.tag_format,
            "compression": self.compression,
            "vm_uuid": self.vm_uuid,
            "channels": self.channels,
            "session": self.session,
            "nonce": self.nonce,
            "postcopy": self.postcopy,
        }

    @classmethod
    def from_meta(cls, m, payload):
        f = "HELLO"
        return cls(
            _uint(m, "version", f, 2**16),
            _uint(m, "ram_size", f, 2**48),
            _uint(m, "page_size", f, 2**32),
            _uint(m, "granule", f, 2**16),
            _field(m, "mte", bool, f),
            _uint(m, "vcpus", f, 4096),
            _field(m, "strategy", str, f),
            _field(m, "tag_format", str, f),
            _field(m, "compression", str, f),
            _field(m, "vm_uuid", str, f),
            _channels(m, f),
            _field(m, "session", str, f)[:64],
            _nonce(m, f),
            _field(m, "postcopy", bool, f),
        )


@dataclass
class Join:
    """Source -> destination, the first frame of an extra data connection:
    it carries data channel ``channel`` of session ``session``; the channel
    after the last data channel (``channel`` = HELLO's ``channels``) is the
    postcopy fault channel."""

    session: str
    channel: int
    proof: bytes = b""
    type = FrameType.JOIN

    def meta(self):
        return {"session": self.session, "channel": self.channel, "proof": self.proof}

    @classmethod
    def from_meta(cls, m, payload):
        return cls(
            _field(m, "session", str, "JOIN")[:64],
            _uint(m, "channel", "JOIN", Hello.MAX_CHANNELS + 1),  # the fault channel follows the last
            _nonce(m, "JOIN", "proof"),
        )


@dataclass
class Auth:
    """Source -> destination, right after WELCOME: the source's proof that it
    holds the shared key (empty when no key is configured).  Nothing else is
    accepted before it.  On a recovery connection it proves the RECOVER
    decision over the nonce of the WELCOME that challenged it."""

    proof: bytes = b""
    type = FrameType.AUTH

    def meta(self):
        return {"proof": self.proof}

    @classmethod
    def from_meta(cls, m, payload):
        return cls(_nonce(m, "AUTH", "proof"))


@dataclass
class Recover:
    """Source -> destination, the first frame of a recovery connection:
    settles a migration left in doubt.  Sent when the control connection
    broke after CONFIRM: the decision for session ``session`` is "go" (the
    source gave the guest up: resume it) or "abort" (it kept the guest:
    discard yours).  The source sends it on its own; an operator can with
    ``mte-migrate resolve``.  The destination answers with a challenge
    (WELCOME with a fresh nonce) and acts only on the AUTH that follows: with
    a shared key its proof is the HMAC over "recover", the session, the
    decision and that nonce, so a captured RECOVER and AUTH are worth nothing
    on another connection.  For "go" the destination then answers RESUMED.
    After the postcopy switch the decision is "postcopy": the link broke
    and the source resumes the same migration on this connection.
    """

    session: str
    decision: str
    type = FrameType.RECOVER

    def meta(self):
        return {"session": self.session, "decision": self.decision}

    @classmethod
    def from_meta(cls, m, payload):
        decision = _field(m, "decision", str, "RECOVER")
        if decision not in ("go", "abort", "postcopy"):
            raise ProtocolError(f"RECOVER decision must be 'go', 'abort' or 'postcopy', got {decision[:20]!r}")
        return cls(_field(m, "session", str, "RECOVER")[:64], decision)


@dataclass
class Welcome:
    """Destination -> source: HELLO (or, on a data connection, JOIN)
    accepted; on a recovery connection, the challenge to RECOVER.
    Answering HELLO it carries the destination's nonce and, with a shared
    key, its proof that it holds the key.  Answering RECOVER it carries a
    fresh nonce, made for this connection only, that the source's AUTH must
    prove the decision over (and no proof of its own)."""

    version: int
    nonce: bytes = b""
    proof: bytes = b""
    #: answering HELLO: every page of the destination's RAM is allocated
    #: already (preallocated), so landing a page costs a copy and no fault.
    #: A hint for how many channels carry pages; absent means False.
    ram_ready: bool = False
    type = FrameType.WELCOME

    def meta(self):
        m = {"version": self.version, "nonce": self.nonce, "proof": self.proof}
        if self.ram_ready:  # absent from peers that predate it
            m["ram_ready"] = True
        return m

    @classmethod
    def from_meta(cls, m, payload):
        ready = _field(m, "ram_ready", bool, "WELCOME") if "ram_ready" in m else False
        return cls(_uint(m, "version", "WELCOME", 2**16), _nonce(m, "WELCOME"), _nonce(m, "WELCOME", "proof"), ready)


def _page_ranges(m, frame: str, limit: int) -> list:
    """A "r" field: (first page, count) pairs packed as little-endian u64s,
    at most ``limit`` pairs, none empty."""
    raw = _field(m, "r", bytes, frame)
    if len(raw) % 16 or len(raw) // 16 > limit:
        raise ProtocolError(f"{frame} ranges field is not a list of (page, count) pairs, at most {limit}")
    if array("Q").itemsize != 8:  # pragma: no cover - exotic platforms
        raise ProtocolError("unsupported platform word size")
    flat = array("Q")
    flat.frombytes(raw)
    ranges = list(zip(flat[0::2], flat[1::2]))
    if any(c == 0 for _, c in ranges):
        raise ProtocolError(f"{frame} batch has an empty range")
    return ranges


def _pack_ranges(ranges) -> bytes:
    return array("Q", [v for r in ranges for v in r]).tobytes()


class Gather:
    """Buffers that travel one after another as one field: a batch's data
    pages where they lie in the sender's snapshot, sent with one gathering
    system call instead of first being copied together."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts):
        self.parts = list(parts)
        self.nbytes = sum(map(len, self.parts))

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def flat(data):
    """``data`` as one buffer (a Gather joined)."""
    return bytes(data) if isinstance(data, Gather) else data


@dataclass
class Pages:
    """Source -> destination: a batch of pages, their data and their tags.
    ``ranges`` is a list of (first_page, count); ``flags`` one byte per page
    (PAGE_ZERO, PAGE_TAGS, PAGE_KEEP); ``data`` holds the pages that are
    neither zero nor KEEP, in order, ``tags`` the packed tags of PAGE_TAGS
    pages in order, each zstd-compressed when ``data_compressed`` /
    ``tags_compressed``."""

    pass_no: int
    ranges: list
    flags: bytes
    data: object = b""
    tags: object = b""
    data_compressed: bool = False
    tags_compressed: bool = False
    #: CRC32 of the pages as they must read on the destination -- data pages
    #: and zero pages (4 KiB of zeros each) in batch order, KEEP pages left
    #: out -- and of the tags payload as sent.  With both, the frame checks
    #: its own payload (checksum "full"): the receiver verifies the data
    #: where it is cheapest, e.g. on the landed memory it digests anyway.
    dcrc: int | None = None
    tcrc: int | None = None
    #: the data went out straight from the memory of a guest that runs (no
    #: snapshot): a page it wrote between the CRC and the send makes the
    #: data fail ``dcrc`` without any corruption.  The destination lands
    #: such a frame anyway and reports it torn (APPLIED); the source holds
    #: that to its next dirty harvest, which must hold one of its pages.
    live: bool = False
    #: a hint: the source has watched its guest write nothing since the
    #: migration began, so the destination records only each landed whole
    #: chunk's CRC and not its 16 KiB piece CRCs (64 more CRC calls a chunk:
    #: 0.09 s of its CPU a GiB); a chunk written later is then read whole
    quiet: bool = False
    #: received straight into guest RAM (``data`` is then None): see
    #: decode_pages_head and FrameChannel.placer
    landed: bool = False
    type = FrameType.PAGES

    @property
    def npages(self) -> int:
        return len(self.flags)

    @property
    def self_checked(self) -> bool:
        return self.dcrc is not None and self.tcrc is not None

    def meta(self):
        m = {
            "p": self.pass_no,
            "r": _pack_ranges(self.ranges),
            "f": bytes(self.flags),
            "dc": self.data_compressed,
            "tc": self.tags_compressed,
            "dl": len(self.data),
        }
        if self.self_checked:
            m["dk"], m["tk"] = self.dcrc, self.tcrc
            if self.live:
                m["lv"] = self.live
        if self.quiet:
            m["qt"] = self.quiet
        return m

    def payload(self):
        if isinstance(self.data, Gather):
            return [*self.data.parts, self.tags]
        return [self.data, self.tags]

    @classmethod
    def from_meta(cls, m, payload):
        fields, dl = cls.fields_of(m, len(payload))
        frame = cls(data=payload[:dl], tags=payload[dl:], **fields)
        frame.check_tags()
        return frame

    @classmethod
    def fields_of(cls, m, payload_len: int) -> tuple[dict, int]:
        """The checked fields of a PAGES meta and the data length, before the
        payload is read (``payload_len`` from the header)."""
        f = "PAGES"
        raw_ranges = _field(m, "r", bytes, f)
        flags = _field(m, "f", bytes, f)
        dl = _uint(m, "dl", f, MAX_PAYLOAD + 1)
        ranges = _page_ranges(m, f, limit=len(raw_ranges))  # the page total bounds them below
        total = sum(c for _, c in ranges)
        if not ranges or total != len(flags) or total > MAX_BATCH_PAGES:
            raise ProtocolError(
                f"PAGES batch has {total} pages in ranges but {len(flags)} flags "
                f"(at most {MAX_BATCH_PAGES} pages per batch)"
            )
        if flags.translate(None, VALID_PAGE_FLAGS):
            raise ProtocolError("PAGES batch has an unknown page flag")
        if dl > payload_len:
            raise ProtocolError(f"PAGES data length {dl} exceeds the payload ({payload_len} bytes)")
        dcrc = tcrc = None
        if "dk" in m or "tk" in m:
            dcrc, tcrc = _uint(m, "dk", f, 2**32), _uint(m, "tk", f, 2**32)
        live = _field(m, "lv", bool, f) if "lv" in m else False
        if live and dcrc is None:
            raise ProtocolError("PAGES frame is marked live but carries no data CRC")
        return dict(
            pass_no=_uint(m, "p", f, 2**32),
            ranges=ranges,
            flags=flags,
            data_compressed=_field(m, "dc", bool, f),
            tags_compressed=_field(m, "tc", bool, f),
            dcrc=dcrc,
            tcrc=tcrc,
            live=live,
            quiet=_field(m, "qt", bool, f) if "qt" in m else False,
        ), dl

    def check_tags(self) -> None:
        if self.tcrc is not None and crc32(self.tags) != self.tcrc:
            raise ProtocolError("PAGES frame tags failed their checksum: the stream is corrupt")


@dataclass
class PassEnd:
    """Source -> destination: this connection's share of pass ``pass_no`` is
    complete (``pages``: how many pages it sent in that pass)."""

    pass_no: int
    pages: int
    type = FrameType.PASS_END

    def meta(self):
        return {"p": self.pass_no, "n": self.pages}

    @classmethod
    def from_meta(cls, m, payload):
        return cls(_uint(m, "p", "PASS_END", 2**32), _uint(m, "n", "PASS_END"))


@dataclass
class Applied:
    """Destination -> source, during precopy: every page of pass ``pass_no``
    has landed (on every channel) and been digested.  The source waits for
    it before it decides whether to stop, so the guest never pauses while
    the destination is still catching up (that work would be downtime)."""

    pass_no: int
    #: (first page, count) of each live PAGES frame of the pass whose data
    #: failed its CRC (torn by a guest write, see Pages.live), merged
    torn: list = field(default_factory=list)
    type = FrameType.APPLIED
    #: at most this many ranges (bounds the meta): beyond it the destination
    #: closes the narrowest gaps between them
    MAX_TORN = 2048

    def meta(self):
        m = {"p": self.pass_no}
        if self.torn:
            m["r"] = _pack_ranges(self.torn)
        return m

    @classmethod
    def from_meta(cls, m, payload):
        torn = _page_ranges(m, "APPLIED", cls.MAX_TORN) if "r" in m else []
        return cls(_uint(m, "p", "APPLIED", 2**32), torn)


@dataclass
class State:
    """Source -> destination, after the final pass: the vCPU and device state,
    msgpack in the payload (bounded like pages)."""

    state: dict
    type = FrameType.STATE

    def meta(self):
        return {}

    def payload(self):
        return [msgpack.packb(self.state)]

    @classmethod
    def from_meta(cls, m, payload):
        try:
            state = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
        except Exception as exc:
            raise ProtocolError(f"STATE payload is not valid msgpack: {exc}") from None
        if not isinstance(state, dict):
            raise ProtocolError("STATE payload must be a map")
        return cls(state)


@dataclass
class Complete:
    """Source -> destination: everything is sent; here is what you should
    hold (digests of data, tags and state) and which pass was the final one."""

    data_digest: str
    tag_digest: str
    state_digest: str
    final_pass: int = 0
    type = FrameType.COMPLETE

    def meta(self):
        return {"d": self.data_digest, "t": self.tag_digest, "s": self.state_digest, "f": self.final_pass}

    @classmethod
    def from_meta(cls, m, payload):
        f = "COMPLETE"
        return cls(_field(m, "d", str, f), _field(m, "t", str, f), _field(m, "s", str, f), _uint(m, "f", f, 2**32))


@dataclass
class Confirm:
    """Destination -> source: the digests of what I hold.  The payload carries the per-chunk
    CRCs of data and tags (4 bytes each per 1 MiB chunk of RAM), so the source
    can tell which chunks differ when the digests do."""

    data_digest: str
    tag_digest: str
    state_digest: str
    chunk_crcs: bytes = b""
    type = FrameType.CONFIRM

    def meta(self):
        return {"d": self.data_digest, "t": self.tag_digest, "s": self.state_digest}

    def payload(self):
        return [self.chunk_crcs]

    @classmethod
    def from_meta(cls, m, payload):
        f = "CONFIRM"
        return cls(_field(m, "d", str, f), _field(m, "t", str, f), _field(m, "s", str, f), bytes(payload))


@dataclass
class Inspect:
    """Source -> destination: send per-page detail for these RAM chunks (at
    most MAX_CHUNKS per frame)."""

    chunks: list
    type = FrameType.INSPECT
    MAX_CHUNKS = 64

    def meta(self):
        return {"c": list(self.chunks)}

    @classmethod
    def from_meta(cls, m, payload):
        chunks = _field(m, "c", list, "INSPECT")
        if len(chunks) > cls.MAX_CHUNKS or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks
        ):
            raise ProtocolError(f"INSPECT wants a list of at most {cls.MAX_CHUNKS} chunk numbers")
        return cls(chunks)


@dataclass
class Inspection:
    """Destination -> source: the detail INSPECT asked for.  Per page of the
    requested chunks, a data CRC (4 bytes) followed by the page's effective
    packed tags (128 bytes)."""

    chunks: list
    detail: bytes
    type = FrameType.INSPECTION

    def meta(self):
        return {"c": list(self.chunks)}

    def payload(self):
        return [self.detail]

    @classmethod
    def from_meta(cls, m, payload):
        chunks = _field(m, "c", list, "INSPECTION")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks):
            raise ProtocolError("INSPECTION chunk numbers must be non-negative integers")
        return cls(chunks, bytes(payload))


#: bytes per page of a POSTCOPY table: CRC-32 of the data, CRC-32 of the packed tags
POSTCOPY_ENTRY = 8


@dataclass
class Postcopy:
    """Either way: from the source, the pages postcopy will fetch, or their table.
    After STATE, without a table, ``ranges`` announce pages the
    destination does not hold as they now are; at the one with ``last`` set
    it drops them all and resumes the guest (they come later, asked for or
    in the background).  Before the pause (in precopy, MISSING mode only),
    without a table, they are discarded ahead: pages the guest dirtied
    since the last pass, which the destination punches at once and
    acknowledges, at the one with ``last``, with APPLIED of the postcopy
    pass (the one after the last pass); only STATE may follow, and the
    switch announces them again with the rest.  With a
    table, which follows, it holds per page of ``ranges`` in order the
    CRC-32 of its data and of its packed tags on the paused source, by
    which each page is checked as it lands.

    From the destination, on a connection that resumes postcopy after a
    broken link (RECOVER "postcopy"), without a table: the pages it still
    lacks, ``last`` on the final one; the source sends exactly those."""

    ranges: list
    table: bytes
    last: bool = True
    type = FrameType.POSTCOPY
    MAX_RANGES = 65536
    MAX_PAGES = MAX_PAYLOAD // POSTCOPY_ENTRY

    def meta(self):
        return {"r": _pack_ranges(self.ranges), "l": self.last}

    def payload(self):
        return [self.table]

    @property
    def npages(self) -> int:
        return sum(c for _, c in self.ranges)

    @classmethod
    def from_meta(cls, m, payload):
        f = "POSTCOPY"
        ranges = _page_ranges(m, f, cls.MAX_RANGES)
        npages = sum(c for _, c in ranges)
        if len(payload) and (npages > cls.MAX_PAGES or len(payload) != npages * POSTCOPY_ENTRY):
            raise ProtocolError(
                f"POSTCOPY table is {len(payload)} bytes for {npages} pages "
                f"({POSTCOPY_ENTRY} a page, at most {cls.MAX_PAGES} pages a frame)"
            )
        return cls(ranges, bytes(payload), _field(m, "l", bool, f))


@dataclass
class Request:
    """Destination -> source, on the fault channel during postcopy: the
    guest waits for these pages; they come back on the same channel, never
    behind the background stream."""

    ranges: list
    type = FrameType.REQUEST
    MAX_RANGES = 256

    def meta(self):
        return {"r": _pack_ranges(self.ranges)}

    @classmethod
    def from_meta(cls, m, payload):
        return cls(_page_ranges(m, "REQUEST", cls.MAX_RANGES))


@dataclass
class Go:
    """Source -> destination: I have given the guest up; resume it."""

    type = FrameType.GO

    def meta(self):
        return {}

    @classmethod
    def from_meta(cls, m, payload):
        return cls()


@dataclass
class Resumed:
    """Destination -> source: the guest runs here now."""

    type = FrameType.RESUMED

    def meta(self):
        return {}

    @classmethod
    def from_meta(cls, m, payload):
        return cls()


@dataclass
class Error:
    """Either way: the migration failed.  ``code`` names the kind of failure
    (e.g. "mismatch", "busy", "auth"), ``message`` is one line for the user."""

    code: str
    message: str
    type = FrameType.ERROR

    def meta(self):
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_meta(cls, m, payload):
        return cls(_field(m, "code", str, "ERROR")[:64], _field(m, "message", str, "ERROR")[:1000])


@dataclass
class Abort:
    """Either way: stop now (e.g. the user cancelled)."""

    reason: str
    type = FrameType.ABORT

    def meta(self):
        return {"reason": self.reason}

    @classmethod
    def from_meta(cls, m, payload):
        return cls(_field(m, "reason", str, "ABORT")[:1000])


FRAME_CLASSES = {
    cls.type: cls
    for cls in (
        Hello,
        Welcome,
        Pages,
        PassEnd,
        Applied,
        State,
        Complete,
        Confirm,
        Inspect,
        Inspection,
        Go,
        Resumed,
        Error,
        Abort,
        Join,
        Auth,
        Recover,
        Postcopy,
        Request,
    )
}


# -- codec ------------------------------------------------------------------------
def encode(frame, checksum="full", mac=None) -> list:
    """Frame -> list of buffers to send in order (payload buffers not copied).
    ``checksum``: a mode of CHECKSUM_FLAGS (or a bool, see checksum_mode).
    ``mac``: the sending half of a sealed connection (auth.FrameMac): the
    frame gets FLAG_MAC and the trailer ``mac.tag(header[:12], meta, payload)``."""
    meta = msgpack.packb(frame.meta())
    # (C iterators: a frame whose zero pages stay off the wire has a part a run of data pages, 256 in the mixed image)
    payload = list(filter(len, frame.payload() if hasattr(frame, "payload") else []))
    payload_len = sum(map(len, payload))
    if len(meta) > MAX_META or payload_len > MAX_PAYLOAD:
        raise ValueError(f"{frame.type.name} frame too large: meta {len(meta)}, payload {payload_len}")
    mode = checksum_mode(checksum)
    flags = CHECKSUM_FLAGS[mode]
    if mode == "full" and getattr(frame, "self_checked", False):
        flags |= FLAG_CRC_META_ONLY  # its payload is checked by fields of the (covered) meta
    if mac is not None:
        flags |= FLAG_MAC
    head = struct.pack("<2sBBII", MAGIC, frame.type, flags, len(meta), payload_len)
    crc = 0
    if flags & FLAG_CRC:
        crc = crc32(meta, crc32(head))
        if not flags & FLAG_CRC_META_ONLY:
            for p in payload:
                crc = crc32(p, crc)
    out = [head + struct.pack("<I", crc) + meta, *payload]
    if mac is not None:
        out.append(mac.tag(head, meta, payload))
    return out


@dataclass
class Header:
    """A frame header, checked by parse_header (``raw``: its 16 bytes)."""

    type: FrameType
    flags: int
    meta_len: int
    payload_len: int
    crc: int
    raw: bytes = field(repr=False, default=b"")

    @property
    def trailer_len(self) -> int:
        return trailer_size(self.flags)

    @property
    def total(self) -> int:
        return frame_size(self.flags, self.meta_len, self.payload_len)


def trailer_size(flags: int) -> int:
    """Bytes after the payload: the MAC of a FLAG_MAC frame."""
    return MAC_SIZE if flags & FLAG_MAC else 0


def frame_size(flags: int, meta_len: int, payload_len: int) -> int:
    """The whole frame on the wire: header, meta, payload and trailer."""
    return HEADER_SIZE + meta_len + payload_len + trailer_size(flags)


def parse_header(raw, require_crc=False) -> Header:
    """Check a 16-byte header; bounds are enforced here, before any allocation.
    ``require_crc`` is the receiver's checksum mode (or a bool): a frame that
    covers less than it requires is refused, otherwise one flipped bit in the
    flags byte would switch the checksum off (the other flag bits are inside
    the CRC)."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"truncated frame header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, ftype, flags, meta_len, payload_len, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}: not an mte-migrate stream")
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    if (
        flags & ~(FLAG_CRC | FLAG_CRC_META_ONLY | FLAG_MAC)
        or flags & (FLAG_CRC | FLAG_CRC_META_ONLY) == FLAG_CRC_META_ONLY
    ):
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    required = checksum_mode(require_crc)
    if required != "none" and not flags & FLAG_CRC:
        raise ProtocolError(
            f"{ftype.name} frame has no checksum, but this side requires one (give both sides the same --checksum)"
        )
    if required == "full" and flags & FLAG_CRC_META_ONLY and ftype != FrameType.PAGES:
        raise ProtocolError(
            f"{ftype.name} frame's checksum leaves its payload out, but this side requires "
            f"--checksum full (give both sides the same --checksum)"
        )
    if meta_len > MAX_META:
        raise ProtocolError(f"{ftype.name} meta length {meta_len} exceeds the limit {MAX_META}")
    if payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"{ftype.name} payload length {payload_len} exceeds the limit {MAX_PAYLOAD}")
    return Header(ftype, flags, meta_len, payload_len, crc, bytes(raw))


def decode(header: Header, meta_bytes, payload, require_crc=False):
    """Header + meta + payload -> a frame object, checking CRC and types.
    A receiver requiring "full" coverage takes a frame whose CRC leaves the
    payload out only if the frame checks its payload itself (PAGES with
    data and tags checksums)."""
    frame = FRAME_CLASSES[header.type].from_meta(_checked_meta(header, meta_bytes, payload), payload)
    if (
        header.flags & FLAG_CRC_META_ONLY
        and checksum_mode(require_crc) == "full"
        and not getattr(frame, "self_checked", False)
    ):
        raise ProtocolError(
            f"{header.type.name} frame's checksum leaves its payload out, but this side requires "
            f"--checksum full (give both sides the same --checksum)"
        )
    return frame


def decode_pages_head(header: Header, meta_bytes, require_crc=False) -> tuple[dict, int]:
    """The first half of decoding a PAGES frame whose payload is still on the
    wire: the CRC of header and meta (a CRC that leaves the payload out: the
    frame checks its data and tags itself, or checksum mode "meta"), the
    meta's fields and bounds.  Returns (fields, data length) as
    Pages.fields_of does; decode() still decides the frame as a whole."""
    if header.type != FrameType.PAGES or not header.flags & FLAG_CRC_META_ONLY:
        raise ValueError("only a PAGES frame whose CRC leaves the payload out can be decoded before its payload")
    return Pages.fields_of(_checked_meta(header, meta_bytes), header.payload_len)


def _checked_meta(header: Header, meta_bytes, payload=None) -> dict:
    """The frame's CRC checked (over the payload too unless the frame's CRC
    leaves it out) and its meta unpacked into a map."""
    if header.flags & FLAG_CRC:
        crc = crc32(meta_bytes, crc32(header.raw[:12]))
        if not header.flags & FLAG_CRC_META_ONLY:
            crc = crc32(payload, crc)
        if crc != header.crc:
            raise ProtocolError(
                f"{header.type.name} frame failed its checksum "
                f"(crc {crc:#010x}, expected {header.crc:#010x}): the stream is corrupt"
            )
    try:
        meta = msgpack.unpackb(bytes(meta_bytes), raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"{header.type.name} frame meta is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{header.type.name} frame meta must be a map")
    return meta


class FrameBuffer:
    """Sans-I/O decoder for tests and in-memory joins: feed bytes, get frames.
    A FLAG_MAC frame's trailer is split off and not checked here (that takes
    the connection's key: Connection.feed); ``units`` gives it."""

    def __init__(self, require_crc=False):
        self._buf = bytearray()
        self.require_crc = require_crc

    def units(self, data) -> list:
        """(header, meta, payload, trailer) of every frame now complete."""
        self._buf += data
        out = []
        while len(self._buf) >= HEADER_SIZE:
            header = parse_header(bytes(self._buf[:HEADER_SIZE]), self.require_crc)
            total = header.total
            if len(self._buf) < total:
                break
            body = HEADER_SIZE + header.meta_len + header.payload_len
            meta = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + header.meta_len])
            payload = bytes(self._buf[HEADER_SIZE + header.meta_len : body])
            trailer = bytes(self._buf[body:total])
            del self._buf[:total]
            out.append((header, meta, payload, trailer))
        return out

    def feed(self, data) -> list:
        return [decode(h, m, p, self.require_crc) for h, m, p, _ in self.units(data)]

    @property
    def pending(self) -> int:
        return len(self._buf)
