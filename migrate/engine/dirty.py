"""What the guest wrote since the last look: KVM's dirty log of every
memslot, the VMM's own bitmap of device writes and, with the tag-dirty-log
strategy, the pages whose tags alone changed.  With ``--validate tracked``
every harvest also marks the validation digest's chunks stale where the
guest wrote (the default digest trusts no harvest)."""

from migrate.engine.bitmaps import runs


def union(a: bytes, b: bytes) -> bytes:
    """Bytewise OR of two 0/1 page maps, in bulk (big-int OR, not per page)."""
    if b.find(1) < 0:
        return a
    if a.find(1) < 0:
        return b
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


class DirtyLog:
    """The source's dirty page tracking, from ``start`` to ``stop``;
    ``result["dirty_sync_count"]`` counts the harvests."""

    def __init__(self, host, result: dict):
        self.host = host
        self.result = result
        self.strategy = None
        self.digest = None
        self.last_count: int | None = None  # pages the last harvest found

    def start(self, strategy, digest) -> None:
        """Dirty logging on, before the first page is read: the rule "clear /
        write-protect first, then copy" from pass 0 on."""
        self.strategy, self.digest = strategy, digest
        vm = self.host.vm
        for slot in vm.memslots:
            vm.enable_dirty_logging(slot.slot)
        self.host.vmm_dirty.enabled = True

    def stop(self) -> None:
        vm = self.host.vm
        for slot in vm.memslots:
            if vm.dirty_logging():
                vm.disable_dirty_logging(slot.slot)
        self.host.vmm_dirty.enabled = False

    def harvest(self) -> bytes:
        """KVM_GET_DIRTY_LOG on every memslot, merged with the VMM's own
        bitmap of device writes: one byte per page, 1 = dirty."""
        vm, npages = self.host.vm, self.host.memory.npages
        merged = bytearray(npages)
        for slot in vm.memslots:
            log_ = vm.get_dirty_log(slot.slot)
            merged[slot.first_page : slot.first_page + slot.npages] = log_.bitmap
        vmm = self.host.vmm_dirty.harvest()
        merged = union(bytes(merged), vmm)
        self._mark_digest_stale(merged)
        self.result["dirty_sync_count"] += 1
        self.last_count = merged.count(1)
        return merged

    def harvest_tags_only(self, data_dirty: bytes) -> bytes:
        """Pages in the strategy's tags-dirty log whose data is not being
        resent anyway (with the proposed tag-dirty-log strategy only)."""
        tag_dirty = self.strategy.harvest_tag_dirty()
        if tag_dirty is None or tag_dirty.find(1) < 0:
            return b""
        self._mark_digest_stale(tag_dirty)  # tags changed there: the tag CRC is stale
        n = len(tag_dirty)
        # tag_dirty AND NOT data_dirty, in bulk: (t | d) ^ d
        t, d = int.from_bytes(tag_dirty, "little"), int.from_bytes(data_dirty, "little")
        return ((t | d) ^ d).to_bytes(n, "little")

    def rate(self, passes: list[dict]) -> float | None:
        """Pages dirtied per second: the last harvest over the last pass's time."""
        if not passes or self.last_count is None:
            return None
        last = passes[-1]
        return self.last_count / last["seconds"] if last["seconds"] else None

    def _mark_digest_stale(self, bitmap: bytes) -> None:
        if self.digest is None:  # the default digest is taken after the pause, trusting no harvest
            return
        for a, b in runs(bitmap, 1):
            self.digest.mark_stale(a, b)
