"""Batch compression with zstd, forced or adaptive.

'auto' compresses data when the link is the bottleneck and sends it raw when
compressing would be: per batch it compares the measured cost of sending raw
(bytes / link rate) with compressing (bytes / compression rate + compressed
bytes / link rate), from moving averages of what it has seen.  It measures
on a sample of the batch -- 16 spans of 4 KiB spread over it -- first and
then one batch in PROBE_EVERY, so that sending raw over a fast link costs
64 KiB of compression in 16 MiB, not a whole batch in 16 (zstd -1 on 1 MiB:
0.3 ms of noise, 0.8 ms of the mixed image); a batch it decides to compress
refreshes the estimates as well (while compressing, no sample is taken:
every batch is measured whole).
Tags are always compressed unless compression is 'none': they are small and
compress well, and zstd costs ~1.5 us a call, so they are compressed a batch
at a time, never per page.
"""

import time

import zstandard

from migrate.protocol.frames import flat

AUTO_LEVEL = 1
#: a link measured at least this fast (bytes/s) outruns the destination's
#: landing of pages (1.0-1.4 GB/s of guest RAM on loopback here), so bytes
#: it carries in addition cost no time
FAST_LINK = 2e9
#: sends that waited for room before the link counts as measured
LINK_SAMPLES = 4
#: the destination, not the network, is the bottleneck when its TCP receive
#: window held the sender back this share of its send time (a 2-core
#: loopback migration: about 0.6; through a link capped at 1 GB/s: 0)
RECEIVER_BOUND = 0.25
#: allocator-like tags, 1 MiB chunks of a guest: level -3 packs 32 KiB of
#: tags in 20 us to 14 % (level 1: 28 us, 12 %) and they unpack in 12 us
#: rather than 15; on the wire that is 0.45 % of the data instead of 0.37 %
TAG_LEVEL = -3


class _Ewma:
    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class Compressor:
    PROBE_EVERY = 16
    SAMPLE_SPANS, SAMPLE_SPAN = 16, 4096

    def __init__(self, mode: str = "auto", link_cap: float | None = None):
        self.mode = mode
        self.link_cap = link_cap
        level = AUTO_LEVEL if mode in ("auto", "none") else int(mode)
        self._data = zstandard.ZstdCompressor(level=level)
        self._tags = zstandard.ZstdCompressor(level=TAG_LEVEL)
        self.compress_rate = _Ewma()  # input bytes per second of compression
        self.ratio = _Ewma()  # output / input
        self.link_rate = _Ewma()  # wire bytes per second
        self.link_samples = 0  # sends that waited for room (see observe_link)
        self._receiver_s = _Ewma(0.1)  # per send: seconds the receiver's window held it back
        self._send_s = _Ewma(0.1)  # per send: seconds
        self._since_probe = 0
        self._compressing = False  # the last decision
        self.probes = 0  # samples compressed to measure
        self.batches_compressed = 0
        self.batches_raw = 0

    def observe_link(
        self, nbytes: int, seconds: float, receiver_limited_s: float | None = None, waited_for_room: bool = True
    ) -> None:
        """A send of ``nbytes`` took ``seconds``, of which the receiver's TCP
        window held it back ``receiver_limited_s`` (None: not known).

        ``waited_for_room``: whether the socket was full at some point of the
        send.  One that never was went out as fast as this side could give
        it bytes, so its rate only bounds the link's from below: it may raise
        the estimate, never lower it.  Over loopback a third of the sends
        took 4-6 ms for 4 MiB without once finding the socket full -- the
        sending thread waiting for the interpreter lock or a core -- and read
        as a link below FAST_LINK often enough to split 2-16 % of the mixed
        image's chunks around their zero pages."""
        if seconds > 0 and nbytes >= 64 * 1024:
            rate = nbytes / seconds
            if waited_for_room:
                self.link_samples += 1
            if waited_for_room or (self.link_rate.value is not None and rate > self.link_rate.value):
                self.link_rate.add(rate)
            if receiver_limited_s is not None:
                # Kept as two averages, not one of ratios: the kernel counts
                # in jiffies (4 ms at HZ=250), longer than many sends.
                self._receiver_s.add(min(receiver_limited_s, seconds))
                self._send_s.add(seconds)

    def _effective_link(self) -> float | None:
        # Measured once LINK_SAMPLES sends have waited for room: the first
        # of them set the average alone, and over loopback the first ones,
        # while the destination starts, read as low as 0.5 GB/s (a mixed
        # image then went split for its first 17 frames of 256).
        rate = self.link_rate.value if self.link_samples >= LINK_SAMPLES else None
        if self.link_cap is not None:
            rate = self.link_cap if rate is None else min(rate, self.link_cap)
        return rate

    def _should_compress(self, data) -> bool:
        if self.mode == "none":
            return False
        if self.mode != "auto":
            return True
        self._since_probe += 1
        # Compressing, every batch is measured whole; sending raw, a sample
        # every PROBE_EVERY batches keeps the estimates fresh.
        if self.compress_rate.value is None or (not self._compressing and self._since_probe >= self.PROBE_EVERY):
            self._since_probe = 0
            self.probes += 1
            self._measure(self._sample(data))
        link, crate, ratio = self._effective_link(), self.compress_rate.value, self.ratio.value
        self._compressing = link is not None and crate is not None and 1 / crate + ratio / link < 1 / link
        return self._compressing

    def _sample(self, data):
        """SAMPLE_SPANS spans of SAMPLE_SPAN bytes spread evenly over ``data``
        (all of it when that is not larger)."""
        view = memoryview(flat(data)).cast("B")
        n, span = self.SAMPLE_SPANS, self.SAMPLE_SPAN
        if len(view) <= n * span:
            return view
        step = (len(view) - span) // (n - 1)
        return b"".join(view[i * step : i * step + span] for i in range(n))

    def _measure(self, data) -> bytes:
        """Compress ``data``, folding its rate and ratio into the estimates.
        The rate is per second of this thread's CPU: a sample of 64 KiB takes
        some 60 us, and one preemption by another process would make it read
        as a fraction of what the compressor does."""
        t = time.thread_time()
        out = self._data.compress(data)
        dt = time.thread_time() - t
        if dt > 0:
            self.compress_rate.add(len(data) / dt)
        self.ratio.add(len(out) / len(data))
        return out

    def raw_over_fast_link(self) -> bool:
        """Data goes raw (compression none, or auto's last decision) over a
        link not measured yet, or measured, and capped, at FAST_LINK or
        faster -- or measured slower only because the receiver is
        (RECEIVER_BOUND): a per-send
        rate over loopback, where the destination holds the sender back,
        swung between 0.2 and 4.7 GB/s, so that 10-45 % of the mixed
        image's chunks were split around their zero pages, each of those
        costing both sides more than sending them whole."""
        if self.mode not in ("auto", "none") or (self.mode == "auto" and self._compressing):
            return False
        link = self._effective_link()
        if link is None:
            # Not measured yet (the first batch of each channel): taken as
            # fast.  On a slow link that costs one batch's zero pages on the
            # wire; split on a fast one, the destination lands those
            # batches run by run, and in 7 of 8 pairs of the mixed image
            # it spent more CPU (0.93 of it when every chunk went whole).
            return True
        if link >= FAST_LINK:
            return True
        # Measured slower: the network, or a destination that cannot keep
        # up?  The second shows as a closed receive window, and gets the
        # zero pages as data all the same (it lands them in one piece).
        return self.link_cap is None and self.receiver_share() >= RECEIVER_BOUND

    def receiver_share(self) -> float:
        """Of the recent send time, the share the receiver's TCP window held
        the sender back (0 when not known)."""
        if not self._send_s.value or self._receiver_s.value is None:
            return 0.0
        return self._receiver_s.value / self._send_s.value

    def sends_raw(self) -> bool:
        """Data goes raw for now: compression none, or auto over a fast link
        (see raw_over_fast_link)."""
        return self.mode == "none" or self.raw_over_fast_link()

    def decide(self, data) -> bool:
        """Would ``data`` be compressed?  Asked before a batch is built, so
        that memory the guest writes is copied only for a batch that will be
        compressed; pass the answer to compress_data (auto's estimates and
        probes move once a batch, as when compress_data decides)."""
        return bool(len(data)) and self._should_compress(data)

    def compress_data(self, data, decided: bool | None = None) -> tuple[object, bool]:
        """Returns (wire bytes, compressed?).  Incompressible batches go raw.
        ``decided``: what decide() answered for this batch (a caller holding
        memory a running guest writes asks first, and copies the batch only
        if it will be compressed: zstd reads its input more than once, and a
        page written in between could decode wrong in other pages too)."""
        if decided is None:
            decided = bool(len(data)) and self._should_compress(data)
        if not len(data) or not decided:
            self.batches_raw += 1
            return data, False
        whole = flat(data)
        out = self._data.compress(whole) if self.mode != "auto" else self._measure(whole)
        if len(out) >= len(data):
            self.batches_raw += 1
            return data, False
        self.batches_compressed += 1
        return out, True

    def compress_tags(self, tags) -> tuple[object, bool]:
        if self.mode == "none" or not len(tags):
            return tags, False
        out = self._tags.compress(tags)
        return (out, True) if len(out) < len(tags) else (tags, False)


class Decompressor:
    """Bounded decompression: the frame must declare exactly the size the
    receiver expects, and output never exceeds it."""

    def __init__(self):
        self._z = zstandard.ZstdDecompressor()

    def decompress(self, blob, expected: int, what: str):
        from migrate.errors import ProtocolError

        try:
            declared = zstandard.frame_content_size(blob)
        except zstandard.ZstdError:
            raise ProtocolError(f"{what} is not a zstd frame") from None
        if declared != expected:
            raise ProtocolError(f"{what} declares {declared} bytes, expected {expected}")
        try:
            out = self._z.decompress(blob, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"{what} does not decompress: {exc}") from None
        if len(out) != expected:
            raise ProtocolError(f"{what} decompressed to {len(out)} bytes, expected {expected}")
        return out
