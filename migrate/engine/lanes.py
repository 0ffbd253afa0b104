"""Several data connections (``--channels N``, like QEMU's multifd).

Ordering rule: a page always travels on the same channel -- the one of its
4 MiB stripe of four 1 MiB chunks, ``(page // 1024) % N``, N the channels
carrying pages (pages_channels) -- and each
channel is one ordered TCP stream, so a newer copy of a page can never be
overtaken by an older one.  A stripe is the largest frame (1,024 pages): a
channel's share of a populated stretch of RAM goes out in whole-stripe
frames, a quarter as many as chunk-sized ones, and the Python work around
each frame is paid a quarter as often (the source's interpreter time for
1 GiB: 0.11 s against 0.31, in perf).
No cross-channel synchronisation is needed inside a pass; the source still
waits for every channel at the end of a pass (it harvests the dirty log
then), and the destination digests only after every channel has delivered
the final pass's PASS_END.

Channel 0 is the control connection, driven by the main event loop.  Each
extra channel has its own thread running its own asyncio loop, so the parts
that release the GIL -- socket I/O, CRC32, zstd, pwrite -- run in parallel.
"""

from migrate.engine.pages import BatchStats, split_batches
from migrate.protocol import frames as fr

#: pages of one stripe, the unit of RAM a channel carries: the largest frame
STRIPE_PAGES = fr.MAX_BATCH_PAGES


def pages_channels(setting, connections: int, same_host: bool, ram_ready: bool) -> int:
    """How many of the ``connections`` carry pages.  All of them, except
    for ``channels = 'auto'`` with both hosts on one machine and the
    destination's RAM allocated already: then one.  The two processes
    share the machine's cores, and a second stream only adds work (a
    thread, a socket, the hand-offs between them): on 2 cores one channel
    took 10-20 % less time for 1 GiB.  Where the destination's RAM is
    fresh, its first store into each page is the larger cost, and two
    channels pay it on two cores (one channel took 1.2 times as long)."""
    if setting == "auto" and same_host and ram_ready:
        return 1
    return connections


def channel_of(page: int, channels: int) -> int:
    return (page // STRIPE_PAGES) % channels


def partition(ranges, channels: int) -> list[list[tuple[int, int]]]:
    """Split page ranges [(start, end)] by channel, cutting at stripe edges."""
    out = [[] for _ in range(channels)]
    if channels == 1:
        out[0] = list(ranges)
        return out
    for start, end in ranges:
        while start < end:
            stop = min(end, (start // STRIPE_PAGES + 1) * STRIPE_PAGES)
            lane = out[channel_of(start, channels)]
            if lane and lane[-1][1] == start:
                lane[-1] = (lane[-1][0], stop)
            else:
                lane.append((start, stop))
            start = stop
    return out


class SendLane:
    """The sending side of one channel: a batch builder and a frame channel."""

    def __init__(self, index: int, chan, builder, batch_pages: int):
        self.index = index
        self.chan = chan
        self.builder = builder
        self.batch_pages = batch_pages
        self.pages_done = 0
        self.totals = BatchStats()  # everything this channel sent, even if a pass breaks off

    async def send_share(self, pass_no: int, ranges, tag_ranges, check_peer) -> BatchStats:
        """This channel's share of a pass: pages with data and tags, then
        pages whose tags alone changed, then PASS_END."""
        stats = BatchStats()
        builder, chan = self.builder, self.chan
        jobs = [(b, builder.build) for b in split_batches(ranges, self.batch_pages)]
        jobs += [(b, builder.build_tags_only) for b in split_batches(tag_ranges, self.batch_pages)]
        for batch, build in jobs:
            check_peer()
            frame, s = build(pass_no, batch)
            before, held = chan.send_seconds, chan.receiver_limited_s()
            sent = await chan.send(frame)
            after = chan.receiver_limited_s()
            receiver = after - held if held is not None and after is not None else None
            builder.compressor.observe_link(sent, chan.send_seconds - before, receiver, chan.waited_for_room)
            stats.add(s)
            self.totals.add(s)
            self.pages_done += s.pages
        await chan.send(fr.PassEnd(pass_no, stats.pages))
        return stats
