"""Every option of a migration and of its guest, declared once.

The table below is the one place an option is written: its name, what kind
of value it takes, its default, its help and documentation, its command-line
flags and its scenario (TOML) key.  Everything else is derived from it:

- ``MigrationConfig`` and ``GuestSpec`` (spec.py): their fields and defaults;
- the scenario reader (scenario.py): the keys it accepts, their types and
  conversions;
- the command line (migrate/cli.py): the options of run, validate, source,
  dest and endurance, and how they override a scenario;
- the option tables of docs/USAGE.md::

    python -m migrate.config.options --write docs/USAGE.md   # regenerate
    python -m migrate.config.options --check docs/USAGE.md   # exit 1 if stale
"""

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from migrate.units import parse_rate, parse_size

#: The commands that migrate a guest: they take the whole table.
MIGRATING = frozenset({"run", "validate", "source", "dest", "endurance"})

#: --help groups (title, description) by scenario section or Option.group.
GROUPS = {
    "guest": (
        "guest and scenario",
        "override the scenario's [guest] values; a default is what a scenario that leaves the key out gets",
    ),
    "migration": (
        "migration",
        "override the scenario's [migration] values; a default is what a scenario that leaves the key out gets",
    ),
    "output": ("output", None),
}


# -- kinds of value -----------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """What values an option takes and how they are read and shown."""

    name: str
    """How the docs name it."""
    type: object
    """The Python type of a value (the dataclass field's annotation)."""
    toml_types: tuple
    """The TOML types a scenario may write (a bool is never taken for an int)."""
    want: str
    """What a value must be, as an error message says it."""
    parse: Callable
    """(value from the command line or a scenario, what to call it in errors) -> value; raises ValueError."""
    show: Callable = str
    """A value (never None) as a user would write it."""
    none_word: str = ""
    """How a user writes None, when None is a value of this kind ('max', 'none')."""
    quoted: bool = False
    """A scenario writes show()'s text as a TOML string."""
    choices: tuple = ()
    metavar: str | None = None


def _integer(value, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer") from None


def _number(value, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number") from None


def _page_rate(value, what: str) -> float | None:
    if isinstance(value, str) and value.strip().lower() in ("max", "unlimited"):
        return None  # flat out
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number of pages per second or 'max'") from None


def _key_file(value, what: str) -> str:
    # An empty path is an unset shell variable far more often than a choice:
    # taking it as "no key" would silently migrate unauthenticated.
    if not value:
        raise ValueError(f"{what} is empty (an unset variable?); give the key file's path")
    return value


def _show_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _show_number(value) -> str:
    return f"{value:g}"


def _either(words: list[str]) -> str:
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


def _as_is(value, what: str):
    return value


def choice(*values: str, true: str | None = None, false: str | None = None) -> Kind:
    """One of ``values``; a scenario may also write true or false for the
    values given as ``true`` and ``false``."""
    booleans = true is not None
    want = _either([f"'{v}'" for v in values] + (["true/false"] if booleans else []))

    def parse(value, what: str) -> str:
        if booleans and isinstance(value, bool):
            return true if value else false
        if value not in values:
            raise ValueError(f"{what} must be {want}, got {value!r}")
        return value

    name = " | ".join(values) + (" (or true/false)" if booleans else "")
    return Kind(name, str, (str, bool) if booleans else (str,), want, parse, quoted=True, choices=values)


INT = Kind("integer", int, (int,), "an integer", _integer, metavar="N")


def _channels(value, what: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be 'auto' or a number of channels, got {value!r}") from None


CHANNELS = Kind(
    "auto | 1..16", int | str, (int, str), "'auto' or a number of channels", _channels, quoted=True, metavar="auto|N"
)
NUMBER = Kind("number", float, (int, float), "a number", _number, show=_show_number)
TEXT = Kind("text", str, (str,), "a string", _as_is, quoted=True)
BOOL = Kind("true/false", bool, (bool,), "true or false", _as_is, show=lambda v: str(v).lower())
TABLE = Kind("table", dict, (dict,), "a table", lambda v, what: dict(v), show=lambda v: "{}")
SIZE = Kind(
    "size (512MiB, 16GiB, 4096)",
    int,
    (int, str),
    "a size like 512MiB or a number of bytes",
    parse_size,
    show=_show_size,
    quoted=True,
    metavar="SIZE",
)
BANDWIDTH = Kind(
    "bytes/s (125M, 1GiB, none)",
    int | None,
    (int, str),
    "a rate in bytes per second like 125M, or 'none'",
    parse_rate,
    none_word="none",
    quoted=True,
    metavar="RATE",
)
PAGE_RATE = Kind(
    "pages/s or max",
    float | None,
    (int, float, str),
    "a number or 'max'",
    _page_rate,
    show=_show_number,
    none_word="max",
)
COMPRESSION = Kind(
    "auto | none | zstd level",
    str,
    (int, str),
    "'auto', 'none' or a zstd level",
    lambda v, what: str(v),
    quoted=True,
    metavar="auto|none|LEVEL",
)
KEY_FILE = Kind("file", str, (str,), "a file path", _key_file, quoted=True, metavar="FILE")


def _congestion(value, what: str) -> str:
    text = str(value)
    # The kernel's names: TCP_CA_NAME_MAX is 16 bytes with the NUL.
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", text):
        raise ValueError(f"{what} {value!r} is not 'auto', 'system' or the name of a congestion control algorithm")
    return text


CONGESTION = Kind(
    "auto | system | algorithm",
    str,
    (str,),
    "'auto', 'system' or the name of a congestion control algorithm",
    _congestion,
    quoted=True,
    metavar="auto|system|NAME",
)


# -- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    name: str
    """The field of GuestSpec or MigrationConfig and the scenario key (with a
    section); the command's own setting otherwise.  Also the argparse dest."""
    kind: Kind
    default: object
    help: str
    """One line for --help."""
    doc: str = ""
    """The fuller text of the docs and of the dataclass field (help when empty)."""
    section: str | None = None
    """'guest' or 'migration': a field and a key of that scenario section.
    None: a setting of the command itself, on the command line only."""
    flags: tuple = ()
    """Command-line flags that take a value."""
    switch: tuple = ()
    """Command-line flags without a value: they set ``switch_value``."""
    switch_value: object = True
    switch_help: str = ""
    """--help for the switch when it is not the option's own help."""
    metavar: str | None = None
    commands: frozenset = MIGRATING
    group: str | None = None
    """The --help group of a command setting ('guest', 'output'; None: the
    command's own); an option of a section is listed in that section's."""
    workload_param: bool = False
    """The value lands in guest.params[name], not in a field of its own (so
    a scenario writes it inside params)."""
    required: bool = False
    repeat: bool = False
    """The flag may be given more than once; the value is the list."""
    hidden: bool = False
    """Internal: left out of --help and the docs."""

    @property
    def is_field(self) -> bool:
        return self.section is not None and not self.workload_param

    @property
    def toml_key(self) -> str | None:
        """The key in the scenario section (None: not one of its own)."""
        return self.name if self.is_field else None

    @property
    def cli_flags(self) -> tuple:
        return self.flags + self.switch

    @property
    def help_group(self) -> str | None:
        """The key of its --help group in GROUPS (None: the command's own options)."""
        return self.section or self.group

    @property
    def metavar_text(self) -> str:
        return self.metavar or self.kind.metavar or self.name.upper()

    @property
    def has_default(self) -> bool:
        """The default is a value a user could write (not merely unset)."""
        return self.default is not None or bool(self.kind.none_word)

    @property
    def shown_default(self) -> str:
        """The default as a user writes it ('' when unset)."""
        if self.default is None:
            return self.kind.none_word
        return self.kind.show(self.default)

    def help_text(self) -> str:
        """--help for the flags that take a value."""
        shown = self.shown_default
        return f"{self.help} (default: {shown})" if shown and self.flags else self.help


_WORKLOADS = "idle, allocator, retag-churn, stream, hot-set, random, device-dma"

OPTIONS = (
    # -- the commands' own settings --------------------------------------------------------
    Option(
        "retry",
        INT,
        0,
        "after a failure, try again up to N times (the guest keeps running meanwhile); after a postcopy "
        "switch, reconnect the same migration up to N times instead",
        flags=("--retry",),
        commands=frozenset({"run", "source"}),
    ),
    Option(
        "listen",
        TEXT,
        None,
        "address to listen on (port 0: any free port, printed as `listening on HOST:PORT`)",
        flags=("--listen",),
        metavar="HOST:PORT",
        commands=frozenset({"dest"}),
        required=True,
    ),
    Option(
        "expect_uuid",
        TEXT,
        None,
        "refuse any guest with another --vm-uuid",
        flags=("--expect-uuid",),
        metavar="UUID",
        commands=frozenset({"dest"}),
    ),
    Option(
        "run_after",
        NUMBER,
        0.0,
        "keep the migrated guest running this many seconds before exiting",
        flags=("--run-after",),
        metavar="S",
        commands=frozenset({"dest"}),
    ),
    Option(
        "attempts",
        INT,
        1,
        "after a failed migration, discard it and accept another, up to N in all",
        flags=("--attempts",),
        commands=frozenset({"dest"}),
    ),
    Option(
        "connect",
        TEXT,
        None,
        "destination address; give it again for fallbacks tried in order by --retry",
        flags=("--connect",),
        metavar="HOST:PORT",
        commands=frozenset({"source"}),
        required=True,
        repeat=True,
    ),
    Option(
        "warmup",
        NUMBER,
        0.2,
        "let the guest run this many seconds before migrating",
        flags=("--warmup",),
        metavar="S",
        commands=frozenset({"source"}),
    ),
    Option(
        "hops",
        INT,
        100,
        "migrations in all",
        flags=("--hops",),
        commands=frozenset({"endurance"}),
    ),
    # -- guest ------------------------------------------------------------------------------
    Option(
        "scenario",
        TEXT,
        "default",
        "scenario name from `mte-migrate scenarios`, or a TOML file",
        flags=("--scenario",),
        metavar="NAME|FILE",
        group="guest",
    ),
    Option(
        "spec",
        TEXT,
        None,
        "the whole guest and migration, as JSON (how `run` starts its two processes)",
        flags=("--spec",),
        group="guest",
        hidden=True,
    ),
    Option(
        "ram",
        SIZE,
        1 << 30,
        "guest RAM, e.g. 512MiB, 16GiB",
        "Guest RAM in bytes: a positive multiple of 4 KiB.",
        section="guest",
        flags=("--ram",),
    ),
    Option(
        "host",
        choice("sim", "kvm"),
        "sim",
        "host backend: sim (the simulator, anywhere) or kvm (Linux KVM on arm64 with MTE)",
        "Host backend the VMM runs on: `sim`, the simulated host (runs anywhere), or `kvm`, the real Linux "
        "KVM of an arm64 machine with MTE (guest RAM in memfd memslots, bare-metal guest programs; "
        "workloads allocator, retag-churn and idle). `kvm` on a machine without /dev/kvm or without "
        "KVM_CAP_ARM_MTE stops with one line saying so.",
        section="guest",
        flags=("--host",),
    ),
    Option("vcpus", INT, 2, "number of vCPUs", section="guest", flags=("--vcpus",)),
    Option(
        "mte",
        BOOL,
        True,
        "the guest uses MTE",
        "The guest uses MTE; false makes an MTE-less guest, which strategies that map RAM PROT_MTE refuse.",
        section="guest",
    ),
    Option("workload", TEXT, "allocator", f"guest workload ({_WORKLOADS})", section="guest", flags=("--workload",)),
    Option(
        "rate",
        PAGE_RATE,
        5000.0,
        "pages the whole guest dirties per second ('max': flat out)",
        "Target dirtying rate in pages per second for the whole guest; 'max': flat out, 0: halted.",
        section="guest",
        flags=("--rate",),
        metavar="PAGES/S",
    ),
    Option("seed", INT, 1, "workload seed (same seed, same guest)", section="guest", flags=("--seed",)),
    Option(
        "params",
        TABLE,
        {},
        "workload parameters",
        "Workload parameters: fill (share of RAM populated at boot, 0..1), tagged (share of those pages "
        "given tags), region_pages, pages_per_step (stream), hot_pages (hot-set), "
        "dma_policy = tco | match | checked (device-dma).",
        section="guest",
    ),
    Option(
        "fill",
        NUMBER,
        None,
        "share of RAM the workload populates at boot, 0..1 (default: the workload's own)",
        "Share of RAM the workload populates at boot, 0..1; sets params.fill (each workload has its own default).",
        section="guest",
        flags=("--fill",),
        metavar="FRACTION",
        workload_param=True,
    ),
    Option(
        "image",
        TEXT,
        None,
        "load guest RAM from this raw image",
        "Raw image loaded into guest RAM before the workload starts: a file (relative to the scenario "
        "file), or builtin:zero, builtin:random, builtin:mixed.",
        section="guest",
        flags=("--image",),
        metavar="FILE",
    ),
    Option("image_offset", SIZE, 0, "where in guest RAM the image starts", section="guest"),
    Option("image_repeat", BOOL, False, "repeat the image to fill RAM", section="guest", switch=("--image-repeat",)),
    Option(
        "huge_pages",
        choice("auto", "on", "off", true="on", false="off"),
        "auto",
        "destination's guest RAM on 2 MiB pages: auto (as root, without postcopy), on, off",
        "The destination's guest RAM in a tmpfs file of its own that takes huge (2 MiB) pages, as QEMU's "
        "RAM gets them with transparent huge pages: far fewer page allocations as pages land, and a far "
        "cheaper free; whole chunks are then received straight into the mapping, and two channels fault "
        "their pages in at once. Postcopy needs 4 KiB pages (userfaultfd finds a missing page by its hole in the "
        "file). `auto` (the default) uses them on the simulated host when this process may mount a private "
        "tmpfs (CAP_SYS_ADMIN, e.g. root) and `postcopy` is off; a destination still empty when a source "
        "says it may switch to postcopy turns to 4 KiB pages then, and one preallocated (`--prealloc`) "
        "refuses that source. `on` also works without privilege, through a user namespace, stops with one "
        "line when it cannot, and refuses a postcopy source; `off` keeps a memfd of 4 KiB pages. A guest "
        "that touched scattered 4 KiB pages costs up to 2 MiB each at the destination.",
        section="guest",
        flags=("--huge-pages",),
    ),
    # -- migration --------------------------------------------------------------------------
    Option(
        "strategy",
        TEXT,
        "tag-ioctl",
        "tag strategy (see `mte-migrate strategies`)",
        "How the VMM reaches the guest's tags (see `mte-migrate strategies`).",
        section="migration",
        flags=("--strategy",),
    ),
    Option(
        "compression",
        COMPRESSION,
        "auto",
        "zstd: auto decides from measured throughput; none; or a level",
        "Compression of page data with zstd: 'auto' compresses when the link is the bottleneck (decided from "
        "measured throughput and ratio), 'none', or a zstd level from -7 to 22.",
        section="migration",
        flags=("--compression",),
    ),
    Option(
        "max_bandwidth",
        BANDWIDTH,
        None,
        "cap the sending rate, e.g. 125M (bytes/s), 1GiB",
        "Cap on the sending rate in bytes per second, as QEMU's max-bandwidth; 'none': uncapped.",
        section="migration",
        flags=("--max-bandwidth",),
    ),
    Option(
        "tcp_congestion",
        CONGESTION,
        "auto",
        "TCP congestion control of the source's connections: auto, system, or an algorithm such as cubic",
        "TCP congestion control of the connections the source opens (it sends the pages). 'system': the "
        "host's default. 'auto': the same, except on a connection within one host (to a loopback address or "
        "the host's own), which gets cubic, else reno, in place of a model-based algorithm such as BBR: with "
        "no network to model, BBR keeps its window at a few dozen segments and the sender waits on the "
        "acknowledgements of a receiver that shares its cores. Any other word: that algorithm on every "
        "connection; the source fails before migrating if the kernel does not offer it.",
        section="migration",
        flags=("--tcp-congestion",),
    ),
    Option(
        "downtime_limit_ms",
        NUMBER,
        300.0,
        "converged when the estimated downtime (what is left to send / the last dirty pass's rate) <= this",
        "Stop-and-copy once the estimated downtime (what is left to send at the last dirty pass's rate) "
        "is at most this many milliseconds.",
        section="migration",
        flags=("--downtime-limit",),
        metavar="MS",
    ),
    Option(
        "max_passes",
        INT,
        30,
        "stop-and-copy after N dirty passes anyway",
        "Stop-and-copy after this many dirty passes even if not converged (the report says the limit forced it).",
        section="migration",
        flags=("--max-passes",),
    ),
    Option(
        "postcopy",
        BOOL,
        False,
        "switch to postcopy when precopy will not converge (or after --postcopy-after-passes)",
        "Postcopy: after the bulk pass and `postcopy_after_passes` dirty passes, or sooner when the "
        "convergence policy says precopy will not converge, pause the source, move the vCPU state and "
        "resume the guest on the destination at once; the pages it still lacks follow, those it faults "
        "on first, on a connection of their own (the fault channel, one more than `--channels`). Needs a strategy that can place a page and its tags for a running guest "
        "(`mte-migrate strategies` says which). After the switch neither side alone holds the whole "
        "guest: a broken link pauses both until the source reconnects (`--retry`, `mte-migrate resume`; "
        "see `postcopy_hold_s`); a destination lost then loses the guest (the source keeps its paused copy).",
        section="migration",
        switch=("--postcopy",),
    ),
    Option(
        "postcopy_after_passes",
        INT,
        1,
        "with --postcopy: switch after this many dirty passes at most",
        "With postcopy: switch after this many dirty passes at most (0: right after the bulk pass).",
        section="migration",
        flags=("--postcopy-after-passes",),
    ),
    Option(
        "auto_converge",
        BOOL,
        True,
        "throttle the guest's vCPUs when dirty passes stop shrinking",
        "Throttle the guest's vCPUs step by step when dirty passes stop shrinking (QEMU's auto-converge / "
        "cpu-throttle): throttle_initial, then throttle_increment more after each pass that does not halve "
        "what is left, up to throttle_max.",
        section="migration",
        switch=("--no-auto-converge",),
        switch_value=False,
        switch_help="never throttle the guest's vCPUs when dirty passes stop shrinking",
    ),
    Option("throttle_initial", NUMBER, 0.2, "auto-converge's first throttle (share of vCPU time)", section="migration"),
    Option(
        "throttle_increment",
        NUMBER,
        0.1,
        "added to the throttle after each pass that did not shrink enough",
        section="migration",
    ),
    Option("throttle_max", NUMBER, 0.99, "the throttle never goes above this", section="migration"),
    Option(
        "batch_pages",
        INT,
        1024,
        "pages per frame (1..1024)",
        "Pages per PAGES frame, 1..1024. A frame of whole 1 MiB chunks (the bulk pass) lands in one splice "
        "and is checked chunk by chunk; fewer, larger frames cost less work around each.",
        section="migration",
        flags=("--batch-pages",),
    ),
    Option(
        "tag_batch_pages",
        INT,
        256,
        "pages per KVM_ARM_MTE_COPY_TAGS call",
        "Pages per KVM_ARM_MTE_COPY_TAGS call (the tag-ioctl strategies).",
        section="migration",
        flags=("--tag-batch-pages",),
    ),
    Option(
        "channels",
        CHANNELS,
        "auto",
        "data connections, like multifd: auto, or 1..16",
        "Data connections, like QEMU's multifd, 1..16; each page always travels on the same one, so a stale "
        "copy can never overtake a newer one. 'auto': 2, and the pages go on one of them when both hosts are "
        "on one machine and the destination's RAM is allocated already (`--prealloc`; its WELCOME says so). "
        "On one machine of 2 cores, one channel was 10-20 % faster with the destination's RAM preallocated, "
        "and two were faster without: the destination then stores into pages it has not used before, and two "
        "channels take that cost on two cores. A number: that many, all carrying pages.",
        section="migration",
        flags=("--channels",),
    ),
    Option(
        "checksum",
        choice("full", "meta", "none", true="full", false="none"),
        "full",
        "CRC32 per frame: full covers payloads too, catching corruption at the frame; meta covers headers "
        "and metadata, page data and tags being proven end to end by the completion digest; none. Both sides "
        "must agree",
        "CRC32 per frame: 'full' covers payloads too, so corruption is caught at the frame where it happens "
        "(a frame sent straight from the memory of the running guest, which a write can tear between its CRC "
        "and the send, at the end of its pass, when no page of it proves written in the next dirty harvest: "
        "see `ram.torn_pages`); 'meta' covers headers and metadata only, page payloads being proven end to end by the completion "
        "digest; 'none'. Both sides must agree. A scenario may write true (full) or false (none).",
        section="migration",
        flags=("--checksum",),
        switch=("--no-checksum",),
        switch_value="none",
    ),
    Option(
        "validate",
        choice("digest", "reread", "tracked", "full"),
        "digest",
        "how completion is validated: digest (independent of dirty tracking), reread, tracked, full",
        "At completion both sides compare per-chunk digests of data and tags and detail the chunks that "
        "differ. 'digest' takes the source's digest of its memory as it was at the pause without trusting "
        "the dirty log, the VMM's bitmap or anything a strategy reports, so a tracking bug fails validation: "
        "it learns what the guest writes from the host kernel's own page tables (a userfaultfd write watch, "
        "Linux 6.7: WP_ASYNC and PAGEMAP_SCAN); a chunk the bulk pass read from guest RAM for a checked "
        "frame (--checksum full) keeps the CRC the frame took, a thread reads the chunks the guest writes "
        "while it runs, and after the pause the pages written since, the tags stored since (all tags where "
        "the host cannot watch its tag storage), and in one call each the chunks read by neither are read. "
        "Where the host cannot watch writes (an older "
        "kernel, the kvm host) it reads all populated RAM and tags again after the pause, as 'reread' always "
        "does; the report's `digest.write_watch` says which and why. The watch sees stores through the "
        "VMM's own mapping: a VMM whose guest RAM is also written through another process's mapping of it "
        "(a vhost-user backend) needs 'reread'. 'tracked' keeps the source's digest up to date from the "
        "dirty-log harvests instead and so trusts the tracking it should check; the report says so, and "
        "bench never uses it. 'full' compares every page and every tag (what `mte-migrate validate` does).",
        section="migration",
        flags=("--validate",),
    ),
    Option(
        "timeout_s",
        NUMBER,
        8.0,
        "a peer silent this many seconds is dead (found within 1.25 times that)",
        "A peer silent for this many seconds is declared dead (checked four times per period, so detection "
        "takes at most 10 s with the default).",
        section="migration",
        flags=("--timeout",),
        metavar="S",
    ),
    Option(
        "in_doubt_hold_s",
        NUMBER,
        60.0,
        "if the last confirmation is lost, keep the paused guest this long for an operator",
        "How many seconds a side that may own the guest after a lost confirmation keeps it paused, waiting "
        "to be told (the source: a signal; the destination: `mte-migrate resolve`).",
        section="migration",
        flags=("--in-doubt-hold",),
        metavar="S",
    ),
    Option(
        "postcopy_hold_s",
        NUMBER,
        300.0,
        "with --postcopy: if the link breaks after the switch, both sides hold the split guest this long for a resume",
        "With postcopy, after the switch: how many seconds both sides hold the split guest when the link "
        "breaks (the destination running it with vCPUs waiting for missing pages, the source paused with "
        "those pages) for the source to reconnect (by itself with `--retry`, or on `mte-migrate resume`). "
        "When it runs out the destination's guest is lost and the source's paused copy ends with its process.",
        section="migration",
        flags=("--postcopy-hold",),
        metavar="S",
    ),
    Option(
        "prealloc",
        BOOL,
        False,
        "destination: allocate and touch all guest RAM before the source connects, like QEMU's "
        "-mem-prealloc (faster landing; host memory for the whole guest)",
        "Destination: allocate all guest RAM when the VM is created, before the source connects, and touch "
        "every page (QEMU's -mem-prealloc; `MADV_POPULATE_WRITE`), so landing a page costs a copy, not an "
        "allocation or a fault (whole chunks are received straight into the mapping); costs host memory "
        "for RAM the guest never touched, and the time to zero it "
        "before the migration starts (under a hypervisor that reclaims free memory, the fault that backs "
        "each page with host memory too).",
        section="migration",
        switch=("--prealloc",),
    ),
    Option(
        "vm_uuid",
        TEXT,
        "",
        "identity of the guest (checked by a destination started with --expect-uuid)",
        section="migration",
        flags=("--vm-uuid",),
        metavar="UUID",
    ),
    Option(
        "psk_file",
        KEY_FILE,
        None,
        "shared key: both sides prove it before any guest byte moves, then every frame carries a MAC",
        "File holding a shared key (at least 16 bytes, the same on both sides): both sides prove it "
        "(HMAC challenge/response) before any guest byte moves, and from then on every frame of every "
        "connection carries a MAC, so a frame altered, dropped, replayed or reordered on the way ends the "
        "migration at that frame (error code `tampered`) with the guest still on the source. It "
        "authenticates; it does not encrypt (add TLS for that). Without it, anyone on the path can rewrite "
        "the stream.",
        section="migration",
        flags=("--psk-file",),
    ),
    Option(
        "tls_cert",
        TEXT,
        None,
        "this side's TLS certificate (with --tls-key and --tls-ca: mutual TLS 1.3)",
        "This side's TLS certificate (PEM); with tls_key and tls_ca: mutual TLS 1.3.",
        section="migration",
        flags=("--tls-cert",),
        metavar="PEM",
    ),
    Option(
        "tls_key", TEXT, None, "this side's TLS private key", section="migration", flags=("--tls-key",), metavar="PEM"
    ),
    Option(
        "tls_ca",
        TEXT,
        None,
        "CA that must have signed the peer's certificate",
        section="migration",
        flags=("--tls-ca",),
        metavar="PEM",
    ),
    # -- output -----------------------------------------------------------------------------
    Option(
        "json",
        TEXT,
        None,
        "write the result as JSON (its fields: docs/USAGE.md)",
        flags=("--json",),
        metavar="FILE",
        group="output",
    ),
    Option("quiet", BOOL, False, "no progress or summary on stderr", switch=("--quiet", "-q"), group="output"),
    Option(
        "no_summary",
        BOOL,
        False,
        "no summary: `run` prints the merged one of both processes",
        switch=("--no-summary",),
        group="output",
        hidden=True,
    ),
)

BY_NAME = {option.name: option for option in OPTIONS}


def for_command(command: str) -> tuple:
    """The options a command takes, in table order."""
    return tuple(option for option in OPTIONS if command in option.commands)


def fields_of(section: str) -> tuple:
    """The options that are fields of a section's dataclass, in table order."""
    return tuple(option for option in OPTIONS if option.section == section and option.is_field)


def assign(target, option: Option, value) -> None:
    """Set an option's value on a GuestSpec or MigrationConfig."""
    if option.workload_param:
        target.params = {**target.params, option.name: value}  # a copy: scenarios never share params
    else:
        setattr(target, option.name, value)


# -- the docs ------------------------------------------------------------------------------
BEGIN = "<!-- options:begin -->"
END = "<!-- options:end -->"


def _flags_cell(option: Option) -> str:
    value = "|".join(option.kind.choices) or option.metavar_text
    parts = [f"`{flag} {value}`" for flag in option.flags] + [f"`{flag}`" for flag in option.switch]
    return ", ".join(parts) or "—"


def _default_cell(option: Option) -> str:
    if not option.has_default:
        return "—"
    shown = option.shown_default or '""'  # an empty string, as a scenario writes it
    return f"`{shown}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # even inside `code`: GitHub splits table cells on any bare pipe


def _meaning(option: Option) -> str:
    text = option.doc or option.help
    text = text[0].upper() + text[1:]
    return _cell(text if text.endswith(".") else text + ".")


def _section_table(section: str) -> list[str]:
    lines = [
        f"| Command line | `[{section}]` key | Value | Default | Meaning |",
        "|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        if option.section != section or option.hidden:
            continue
        key = f"`params.{option.name}`" if option.workload_param else f"`{option.name}`"
        lines.append(
            f"| {_cell(_flags_cell(option))} | {key} | {_cell(option.kind.name)} | {_default_cell(option)} "
            f"| {_meaning(option)} |"
        )
    return lines


def _command_table() -> list[str]:
    lines = ["| Command line | Commands | Default | Meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        if option.section is not None or option.hidden:
            continue
        commands = "all five" if option.commands == MIGRATING else ", ".join(sorted(option.commands))
        required = "required" if option.required else _default_cell(option)
        lines.append(f"| {_cell(_flags_cell(option))} | {commands} | {required} | {_meaning(option)} |")
    return lines


def toml_line(option: Option) -> str:
    """``key = default`` as a scenario writes it; commented out when there is no default to write."""
    if not option.has_default:
        return f'# {option.name} = "{option.metavar_text}"'
    shown = option.shown_default
    if option.kind.quoted and not (int in option.kind.toml_types and shown.lstrip("-").isdigit()):
        shown = json.dumps(shown)
    return f"{option.name} = {shown}"


def example_scenario() -> str:
    """A scenario that sets every key to its default."""
    lines = ['name = "example"', 'description = "every key at its default"']
    for section in ("guest", "migration"):
        lines += ["", f"[{section}]"] + [toml_line(option) for option in fields_of(section)]
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """The generated block of docs/USAGE.md, markers included."""
    lines = [
        BEGIN,
        "<!-- generated by `python -m migrate.config.options`: edit the table in migrate/config/options.py -->",
        "",
        "### Guest options and `[guest]` keys",
        "",
        *_section_table("guest"),
        "",
        "### Migration options and `[migration]` keys",
        "",
        *_section_table("migration"),
        "",
        "### Options of the commands themselves",
        "",
        "Not in scenarios. *All five*: run, validate, source, dest and endurance.",
        "",
        *_command_table(),
        "",
        "### A scenario with every key at its default",
        "",
        "```toml",
        example_scenario().rstrip("\n"),
        "```",
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def replace_block(text: str) -> str:
    """``text`` (docs/USAGE.md) with its generated block brought up to date."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError("the markers of the generated block are missing")
    return head + markdown().rstrip("\n") + tail


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m migrate.config.options", description="The option tables of the docs."
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--markdown", action="store_true", help="print the generated block")
    mode.add_argument("--write", metavar="DOC", help="bring the generated block of DOC up to date")
    mode.add_argument("--check", metavar="DOC", help="exit 1 if the generated block of DOC is not current")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    path = args.write or args.check
    with open(path) as f:
        text = f.read()
    current = replace_block(text)
    if args.check:
        if current != text:
            print(f"{path}: the option tables are stale; run python -m migrate.config.options --write {path}")
            return 1
        return 0
    with open(path, "w") as f:
        f.write(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
