"""Linux KVM on arm64 through ctypes: the VM with MTE, its memslots over a
memfd, the dirty log, KVM_ARM_MTE_COPY_TAGS and the VMM's PROT_MTE mapping.

The VM object has the simulated ``Vm``'s surface (hosts/kernel.py), so that
strategies and the engine do not know which one they hold.  Every system
call is counted under ``syscalls.<name>``, like the simulator's.

``fcntl.ioctl`` cannot pass a pointer held as an integer, so the calls go
through libc's ``ioctl`` with ctypes (which drops the GIL for the call: a
vCPU thread sits in KVM_RUN while the others go on).
"""

import ctypes
import errno
import mmap
import os
import threading

from .. import tags as tagops
from ..constants import GRANULES_PER_PAGE, PACKED_TAGS_PER_PAGE, PAGE_SIZE
from ..errors import KernelError
from ..kernel import DirtyLog, Memslot, memslot_layout
from ..mapping import VmmMapping
from ..memory import GuestMemory
from . import uapi

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int
_mmap = _libc.mmap
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
PROT_MTE = 0x20

#: 8 bytes (one a page, 0 or 1) for each byte of a dirty bitmap
_BITS_TO_BYTES = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]


def ioctl(fd: int, request: int, arg=None, *, counters=None, name: str = "", quiet: tuple = ()) -> int:
    """libc ioctl; ``arg``: None, an int (passed as the pointer-sized value)
    or a ctypes object (passed by reference).  Raises KernelError with the
    errno's name; errnos in ``quiet`` are returned negated instead."""
    if counters is not None and name:
        counters.add(f"syscalls.{name}")
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    while True:
        ret = _ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err == errno.EINTR and request != uapi.KVM_RUN:
            continue
        if err in quiet:
            return -err
        raise KernelError(errno.errorcode.get(err, "EIO"), f"{name or hex(request)}: {os.strerror(err)}")


def address_of(buf, writable: bool) -> tuple[int, object]:
    """(address, keepalive) of a buffer's bytes for the kernel; a read-only
    buffer is copied once (only TO_GUEST's input can be one)."""
    if isinstance(buf, memoryview) and not buf.readonly and buf.c_contiguous:
        holder = (ctypes.c_char * buf.nbytes).from_buffer(buf)
    elif isinstance(buf, bytearray):
        holder = (ctypes.c_char * len(buf)).from_buffer(buf)
    elif writable:
        raise TypeError("the kernel writes into this buffer: it must be writable")
    else:
        holder = ctypes.create_string_buffer(bytes(buf), len(buf))
    return ctypes.addressof(holder), holder


class KvmSystem:
    """/dev/kvm: the API version and the capabilities."""

    def __init__(self, path: str = "/dev/kvm"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = ioctl(self.fd, uapi.KVM_GET_API_VERSION)
        if version != uapi.KVM_API_VERSION:
            os.close(self.fd)
            raise KernelError("EINVAL", f"KVM API version {version}, expected {uapi.KVM_API_VERSION}")

    def check(self, cap: int, vm_fd: int | None = None) -> int:
        return ioctl(self.fd if vm_fd is None else vm_fd, uapi.KVM_CHECK_EXTENSION, cap)

    def close(self) -> None:
        os.close(self.fd)


class KvmVm:
    """A KVM VM with its RAM in one memfd (``GuestMemory``), mapped shared
    in this process, in one memslot per entry of ``memslot_sizes``."""

    def __init__(self, system: KvmSystem, counters, ram_size: int, memslot_sizes: list[int] | None = None):
        self.system = system
        self.counters = counters
        self.fd = ioctl(system.fd, uapi.KVM_CREATE_VM, 0, counters=counters, name="kvm_create_vm")
        self.memory = GuestMemory(ram_size, "kvm-guest-ram")
        self.mte_enabled = False
        self.vcpu_count = 0
        self.memslots: list[Memslot] = []
        self._logging: set[int] = set()
        self._mappings: list = []
        self._lock = threading.Lock()
        # The VMM's view of RAM is the very mapping the memslots use: code
        # written through it is what the guest fetches (MAP_SHARED memfd).
        anchor = ctypes.c_char.from_buffer(self.memory.data)
        self.host_address = ctypes.addressof(anchor)
        del anchor
        for memslot in memslot_layout(ram_size, memslot_sizes):
            self.memslots.append(memslot)
            self._set_region(memslot, 0)
        # With manual dirty-log protection, KVM_GET_DIRTY_LOG only reads the
        # log and KVM_CLEAR_DIRTY_LOG write-protects what was read again.
        self.manual_protect = False
        if system.check(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, self.fd) & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            self._enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual_protect = True

    def _set_region(self, slot: Memslot, flags: int) -> None:
        region = uapi.UserspaceMemoryRegion(
            slot.slot, flags, slot.guest_phys_addr, slot.size, self.host_address + slot.ram_offset
        )
        ioctl(
            self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region, counters=self.counters, name="kvm_set_user_memory_region"
        )

    def _enable_cap(self, cap: int, arg0: int = 0) -> None:
        req = uapi.EnableCap(cap, 0)
        req.args[0] = arg0
        ioctl(self.fd, uapi.KVM_ENABLE_CAP, req, counters=self.counters, name="kvm_enable_cap")

    # -- KVM_ENABLE_CAP / KVM_CREATE_VCPU -------------------------------------
    def enable_mte(self) -> None:
        """KVM_CAP_ARM_MTE: only before any vCPU exists (KVM says EINVAL after)."""
        self._enable_cap(uapi.KVM_CAP_ARM_MTE)
        self.mte_enabled = True

    def create_vcpu(self) -> int:
        fd = ioctl(self.fd, uapi.KVM_CREATE_VCPU, self.vcpu_count, counters=self.counters, name="kvm_create_vcpu")
        self.vcpu_count += 1
        return fd

    # -- address translation ---------------------------------------------------
    def memslot_for(self, ipa: int) -> Memslot | None:
        for slot in self.memslots:
            if slot.contains(ipa):
                return slot
        return None

    def page_to_ipa(self, page: int) -> int:
        for slot in self.memslots:
            if slot.first_page <= page < slot.first_page + slot.npages:
                return slot.guest_phys_addr + (page - slot.first_page) * PAGE_SIZE
        raise IndexError(f"page {page} is outside guest RAM")

    # -- dirty logging -----------------------------------------------------------
    def enable_dirty_logging(self, slot: int) -> None:
        with self._lock:
            self._set_region(self.memslots[slot], uapi.KVM_MEM_LOG_DIRTY_PAGES)
            self._logging.add(slot)

    def disable_dirty_logging(self, slot: int) -> None:
        with self._lock:
            if slot in self._logging:
                self._set_region(self.memslots[slot], 0)
                self._logging.discard(slot)

    def dirty_logging(self) -> bool:
        return bool(self._logging)

    def get_dirty_log(self, slot: int) -> DirtyLog:
        """Get and clear: KVM_GET_DIRTY_LOG, then (manual protection)
        KVM_CLEAR_DIRTY_LOG of exactly the pages it reported, before the
        caller copies them.  One byte a page, as the simulator's."""
        ms = self.memslots[slot]
        if slot not in self._logging:
            raise KernelError("ENOENT", f"dirty logging is not enabled on memslot {slot}")
        words = -(-ms.npages // 64)
        bitmap = (ctypes.c_uint64 * words)()
        ioctl(
            self.fd,
            uapi.KVM_GET_DIRTY_LOG,
            uapi.DirtyLogArg(slot, 0, ctypes.addressof(bitmap)),
            counters=self.counters,
            name="kvm_get_dirty_log",
        )
        raw = bytes(bitmap)
        if self.manual_protect and raw.count(0) != len(raw):
            ioctl(
                self.fd,
                uapi.KVM_CLEAR_DIRTY_LOG,
                uapi.ClearDirtyLogArg(slot, ms.npages, 0, ctypes.addressof(bitmap)),
                counters=self.counters,
                name="kvm_clear_dirty_log",
            )
        return DirtyLog(ms, bits_to_bytes(raw, ms.npages))

    # -- KVM_ARM_MTE_COPY_TAGS -------------------------------------------------
    def mte_copy_tags(self, guest_ipa: int, length: int, buf, flags: int, reserved=(0, 0), counter_prefix: str = ""):
        """One byte a granule in ``buf``.  TO_GUEST is refused (EBUSY) while
        any memslot logs dirty pages: only a destination writes tags, and it
        never logs.  A partial copy raises (the simulator returns it)."""
        granules = length // (PAGE_SIZE // GRANULES_PER_PAGE)
        if len(buf) < granules:
            raise KernelError("EFAULT", f"tag buffer of {len(buf)} bytes for {granules} granules")
        addr, keep = address_of(buf, writable=flags == uapi.KVM_ARM_TAGS_FROM_GUEST)
        req = uapi.CopyMteTags(guest_ipa, length, addr, flags)
        req.reserved[0], req.reserved[1] = reserved
        self.counters.add(counter_prefix + "syscalls.kvm_arm_mte_copy_tags")
        try:
            done = ioctl(self.fd, uapi.KVM_ARM_MTE_COPY_TAGS, req, name="kvm_arm_mte_copy_tags")
        except KernelError as exc:
            if exc.errno_name == "EBUSY" and self._logging:
                raise KernelError("EBUSY", "KVM refuses TAGS_TO_GUEST while a memslot logs dirty pages") from None
            raise
        finally:
            del keep
        direction = "bytes.tags_to_user" if flags == uapi.KVM_ARM_TAGS_FROM_GUEST else "bytes.tags_from_user"
        self.counters.add(counter_prefix + direction, granules)
        if done != length:
            raise KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS copied {done} of {length} bytes at {guest_ipa:#x}")
        return done

    # -- the VMM's mappings ------------------------------------------------------
    def map_guest_ram(self, prot_mte: bool = False, dirty_tracker=None):
        mapping = KvmMteMapping(self, dirty_tracker) if prot_mte else VmmMapping(self, False, dirty_tracker)
        self._mappings.append(mapping)
        return mapping

    def close(self) -> None:
        for mapping in self._mappings:
            if isinstance(mapping, KvmMteMapping):
                mapping.close()
        os.close(self.fd)
        self.memory.close()


def bits_to_bytes(bitmap: bytes, npages: int) -> bytes:
    """A little-endian dirty bitmap (bit i = page i) as one byte a page."""
    if bitmap.count(0) == len(bitmap):
        return bytes(npages)
    table = _BITS_TO_BYTES
    return b"".join([table[b] for b in bitmap])[:npages]


class MteHelper:
    """libmtehelper.so: LDG / STG per granule (hosts/kvm/native/mte_helper.c)."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        self.load = lib.mte_load_tags
        self.load.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        self.load.restype = ctypes.c_size_t
        self.store = lib.mte_store_tags
        self.store.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        self.store.restype = ctypes.c_size_t


class KvmMteMapping(VmmMapping):
    """A second mapping of the guest's memfd, PROT_READ|PROT_WRITE|PROT_MTE:
    the VMM's tags go through LDG/STG in the native helper, one granule an
    instruction.  The thread's tag-check mode stays the Linux default (none),
    so the VMM's data copies through it are never tag checked."""

    def __init__(self, vm: KvmVm, dirty_tracker=None):
        if not vm.mte_enabled:
            raise ValueError("PROT_MTE mapping of guest RAM needs MTE enabled for the VM")
        from .build import HELPER_SO, artifact

        path = artifact(HELPER_SO)
        if path is None:
            raise ValueError(f"no {HELPER_SO}: build it with `python -m hosts.kvm.build`")
        super().__init__(vm, True, dirty_tracker)
        self.helper = MteHelper(path)
        size = vm.memory.size
        addr = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE | PROT_MTE, mmap.MAP_SHARED, vm.memory.data_fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise KernelError(errno.errorcode.get(err, "EIO"), f"mmap PROT_MTE: {os.strerror(err)}")
        self.base, self.size = addr, size
        self.view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")

    def set_tco(self, on: bool) -> None:
        """Nothing to do: this thread's tag checks are off (Linux's default,
        PR_MTE_TCF_NONE), so no MSR is executed or counted."""

    def read(self, offset, length, pointer_tag=0):
        return self.view[offset : offset + length]

    def write(self, offset, data, pointer_tag=0, populated=False):
        n = len(data)
        self.view[offset : offset + n] = memoryview(data).cast("B")
        self._mark_dirty(offset // PAGE_SIZE, -(-(offset + n) // PAGE_SIZE))

    def write_parts(self, offset, parts, pointer_tag=0):
        pos = offset
        for part in parts:
            n = len(part)
            self.view[pos : pos + n] = memoryview(part).cast("B")
            pos += n
        self._mark_dirty(offset // PAGE_SIZE, -(-pos // PAGE_SIZE))

    def load_tags(self, first_page, npages):
        granules = npages * GRANULES_PER_PAGE
        out = ctypes.create_string_buffer(granules)
        self.helper.load(self.base + first_page * PAGE_SIZE, granules, out)
        self.counters.add("el0.ldg", granules)
        return tagops.pack(out.raw)

    def store_tags(self, first_page, packed):
        if len(packed) % PACKED_TAGS_PER_PAGE:
            raise ValueError(f"packed tags must cover whole pages ({PACKED_TAGS_PER_PAGE} bytes each)")
        npages = len(packed) // PACKED_TAGS_PER_PAGE
        unpacked = tagops.unpack(packed)
        granules = npages * GRANULES_PER_PAGE
        self.helper.store(self.base + first_page * PAGE_SIZE, granules, unpacked)
        self.counters.add("el0.stg", granules)
        self._mark_dirty(first_page, first_page + npages)

    def close(self) -> None:
        self.view.release()
        _munmap(self.base, self.size)
