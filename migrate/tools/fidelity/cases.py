"""The fidelity cases replayed on the simulated kernel (hosts/).

probe.c asks a real arm64 KVM each case and prints one line

    <name> | <setup> | <call> | <result> | <observations>

and this module builds the same case on hosts/ and prints the line the
simulation gives.  tests/test_fidelity.py compares the two, line by line.
Each replay below mirrors its C counterpart step by step (same setup, same
pattern seeds, same observations in the same order); change both together.

Cases hosts/ does not model at all are in NOT_MODELLED with the reason.

Tag strings (describe): one item per page of 256 tags joined by "/": "p<s>"
is the test pattern with seed s (granule g has tag (s + g/16) & 15),
otherwise runs "<hex value>*<count>" joined by ".".  Residency: one
character per page, "1" holds memory, "0" does not.
"""

from collections.abc import Callable

from hosts import KVM_ARM_TAGS_FROM_GUEST as FROM
from hosts import KVM_ARM_TAGS_TO_GUEST as TO
from hosts import Kernel, KernelError
from hosts import tags as tagops
from hosts.constants import GRANULE, PAGE_SIZE, RAM_BASE_IPA

PAGE = PAGE_SIZE
TAGS_PER_PAGE = 256
BASE = RAM_BASE_IPA

Result = int | str  # bytes copied, or an errno's name


# -- the line ------------------------------------------------------------------
def rv(r: Result) -> str:
    return str(r)


class Line:
    """One case's line, built as probe.c builds it."""

    def __init__(self, name: str, setup: str):
        self.parts = [name, setup]
        self.obs: list[str] = []

    def result(self, call: str, r: Result) -> "Line":
        self.parts += [call, rv(r)]
        return self

    def see(self, key: str, value) -> "Line":
        self.obs.append(f"{key}={value}")
        return self

    def text(self) -> str:
        parts = self.parts + (["; ".join(self.obs)] if self.obs else [])
        return " | ".join(parts)


def pat(seed: int, g: int) -> int:
    return (seed + g // 16) & 15


def fill_pat(npages: int, seed: int) -> bytearray:
    """npages of the test pattern, page p with seed (seed + p) & 15."""
    out = bytearray(npages * TAGS_PER_PAGE)
    for p in range(npages):
        for g in range(TAGS_PER_PAGE):
            out[p * TAGS_PER_PAGE + g] = pat((seed + p) & 15, g)
    return out


_PATTERNS = [bytes(pat(s, g) for g in range(TAGS_PER_PAGE)) for s in range(16)]


def describe(buf) -> str:
    buf = bytes(buf)
    items = []
    for start in range(0, len(buf), TAGS_PER_PAGE):
        chunk = buf[start : start + TAGS_PER_PAGE]
        if len(chunk) == TAGS_PER_PAGE and chunk in _PATTERNS:
            items.append(f"p{_PATTERNS.index(chunk):x}")
            continue
        runs, g = [], 0
        while g < len(chunk):
            k = g
            while k < len(chunk) and chunk[k] == chunk[g]:
                k += 1
            runs.append(f"{chunk[g]:x}*{k - g}")
            g = k
        items.append(".".join(runs))
    return "/".join(items)


def copy_call(flags: int, ipa: int, length: int, buf: str) -> str:
    direction = {TO: "TO", FROM: "FROM"}.get(flags, f"flags={flags:#x}")
    where = f"+{ipa - BASE:#x}" if ipa >= BASE else f"{ipa:#x}"
    return f"COPY_TAGS({direction}, ipa={where}, len={length:#x}, buf={buf})"


# -- a VM on the simulated kernel ------------------------------------------------
class SimVm:
    """hosts/'s Vm with the helpers probe.c has: memslots side by side from
    BASE in one memfd (the only backing hosts/ has)."""

    def __init__(self, slots=(4,), mte: bool = True):
        self.kernel = Kernel()
        self.vm = self.kernel.create_vm(sum(slots) * PAGE, [n * PAGE for n in slots])
        self.npages = sum(slots)
        if mte:
            self.vm.enable_mte()
        self._alias = None

    def copy(self, ipa: int, length: int, buf, flags: int, reserved=(0, 0)) -> Result:
        try:
            return self.vm.mte_copy_tags(ipa, length, buf, flags, reserved)
        except KernelError as e:
            return e.errno_name

    def tags_of(self, page: int, npages: int) -> str:
        buf = bytearray(b"\xee" * (npages * TAGS_PER_PAGE))
        r = self.copy(BASE + page * PAGE, npages * PAGE, buf, FROM)
        return describe(buf) if r == npages * PAGE else f"read:{r}"

    def put_tags(self, page: int, npages: int, seed: int) -> Result:
        return self.copy(BASE + page * PAGE, npages * PAGE, fill_pat(npages, seed), TO)

    def residency(self, first: int, npages: int) -> str:
        held = bytearray(b"0" * npages)
        for a, b in self.vm.memory.populated_ranges(first, first + npages):
            held[a - first : b - first] = b"1" * (b - a)
        return held.decode()

    def dirty_log(self, slot: int) -> str:
        try:
            bitmap = self.vm.get_dirty_log(slot).bitmap
        except KernelError as e:
            return e.errno_name
        return "".join("1" if b else "0" for b in bitmap)

    @property
    def alias(self):
        """The VMM's PROT_MTE mapping (LDG/STG)."""
        if self._alias is None:
            self._alias = self.vm.map_guest_ram(prot_mte=True)
        return self._alias

    @property
    def plain(self):
        """The VMM's untagged mapping (the memslots' userspace address)."""
        return self.vm.map_guest_ram()

    def ldg_pages(self, page: int, npages: int) -> str:
        return describe(tagops.unpack(self.alias.load_tags(page, npages)))

    def stg_pages(self, page: int, npages: int, seed: int) -> None:
        self.alias.store_tags(page, tagops.pack(fill_pat(npages, seed)))

    def data_of(self, page: int, npages: int) -> str:
        out = []
        for p in range(page, page + npages):
            data = bytes(self.vm.memory.data[p * PAGE : (p + 1) * PAGE])
            out.append(f"{data[0]:02x}{'' if data == data[:1] * PAGE else '+'}")
        return "/".join(out)

    def close(self) -> None:
        self.vm.close()


# -- the registry --------------------------------------------------------------------
CASES: dict[str, Callable[[], str]] = {}

#: case name prefix -> why hosts/ cannot replay those cases
NOT_MODELLED = {
    "args.struct_null": "hosts/ takes the call's fields as arguments: there is no struct pointer to get wrong",
    "untouched.anon_": "guest RAM in hosts/ is a memfd (shared memory); a private anonymous mapping's read faults "
    "map the shared zero page instead of allocating",
    "backing.anon": "hosts/ backs guest RAM with a memfd only",
    "backing.ramfs-file": "hosts/ backs guest RAM with a memfd only",
    "backing.hugetlb": "hosts/ backs guest RAM with a memfd of base pages only",
    "readonly.": "hosts/ has no read-only memslots and maps guest RAM read/write",
    "fault.from_readonly_buffer": "a read-only user buffer: hosts/ takes Python buffers, which are writable or "
    "raise TypeError, not EFAULT",
    "fault.to_readonly_buffer": "a read-only user buffer (see fault.from_readonly_buffer)",
    "cap.check_extension": "hosts/ has no KVM_CHECK_EXTENSION: MTE is always there to enable",
    "uffd.": "hosts/ has no userfaultfd (post-copy is not modelled)",
}


def not_modelled(name: str) -> str | None:
    for key, reason in NOT_MODELLED.items():
        if name.startswith(key):
            return reason
    return None


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def replay(name: str) -> str | None:
    """The simulation's line for a case, or None if it is not modelled."""
    if not_modelled(name) is not None:
        return None
    fn = CASES.get(name)
    if fn is None:
        raise KeyError(f"no replay for fidelity case {name!r}")
    return fn()


# -- the argument rules of KVM_ARM_MTE_COPY_TAGS ------------------------------------
ARG_CASES = [
    ("args.to_guest", TO, BASE, PAGE, 0, 0),
    ("args.from_guest", FROM, BASE, PAGE, 0, 0),
    ("args.flags_2", 2, BASE, PAGE, 0, 0),
    ("args.flags_3", 3, BASE, PAGE, 0, 0),
    ("args.flags_bit63", 1 << 63, BASE, PAGE, 0, 0),
    ("args.reserved0", TO, BASE, PAGE, 1, 0),
    ("args.reserved1", FROM, BASE, PAGE, 0, 1),
    ("args.ipa_granule", TO, BASE + GRANULE, PAGE, 0, 0),
    ("args.ipa_half_page", FROM, BASE + PAGE // 2, PAGE, 0, 0),
    ("args.len_granule", TO, BASE, GRANULE, 0, 0),
    ("args.len_page_plus_1", FROM, BASE, PAGE + 1, 0, 0),
    ("args.len_0_to", TO, BASE, 0, 0, 0),
    ("args.len_0_from", FROM, BASE, 0, 0, 0),
    ("args.len_0_no_slot", FROM, BASE + 0x10000000, 0, 0, 0),
    ("args.len_0_ipa_unaligned", FROM, BASE + GRANULE, 0, 0, 0),
    ("args.len_0_flags_2", 2, BASE, 0, 0, 0),
    ("args.len_int_max_aligned", FROM, BASE, 0x7FFFF000, 0, 0),
    ("args.len_int_max_aligned_to", TO, BASE, 0x7FFFF000, 0, 0),
    ("args.len_2g", FROM, BASE, 0x80000000, 0, 0),
    ("args.len_4g_plus_page", FROM, BASE, 0x100001000, 0, 0),
    ("args.len_max_aligned", FROM, BASE, 2**64 - 0x1000, 0, 0),
    ("args.ipa_no_slot", FROM, BASE + 0x10000000, PAGE, 0, 0),
    ("args.ipa_zero", TO, 0, PAGE, 0, 0),
    ("args.ipa_below_slot", FROM, BASE - PAGE, 2 * PAGE, 0, 0),
    ("args.ipa_huge", FROM, 1 << 52, PAGE, 0, 0),
]


def _arg_case(name, flags, ipa, length, r0, r1):
    def run():
        v = SimVm()
        v.put_tags(0, 4, 1)
        buf = fill_pat(4, 7)
        call = copy_call(flags, ipa, length, "1024")
        if r0 or r1:
            call = call[:-1] + f", reserved={r0}:{r1})"
        line = Line(name, "mte memfd slots=4").result(call, v.copy(ipa, length, buf, flags, (r0, r1)))
        line.see("tags", v.tags_of(0, 4))
        if flags == FROM:
            line.see("buf", describe(buf))
        v.close()
        return line.text()

    return run


for _c in ARG_CASES:
    CASES[_c[0]] = _arg_case(*_c)

NO_MTE_CASES = [
    ("args.no_mte_to", TO, BASE, PAGE),
    ("args.no_mte_from", FROM, BASE, PAGE),
    ("args.no_mte_len_0", FROM, BASE, 0),
    ("args.no_mte_flags_2", 2, BASE, PAGE),
]


def _no_mte_case(name, flags, ipa, length):
    def run():
        v = SimVm(mte=False)
        line = Line(name, "no-mte memfd slots=4")
        line.result(copy_call(flags, ipa, length, "1024"), v.copy(ipa, length, bytearray(1024), flags))
        line.see("res", v.residency(0, 4))
        v.close()
        return line.text()

    return run


for _c in NO_MTE_CASES:
    CASES[_c[0]] = _no_mte_case(*_c)


# -- return values: partial copies at the end of memslots ---------------------------
@case("part.end_of_slot_to")
def _():
    v = SimVm()
    line = Line("part.end_of_slot_to", "mte memfd slots=4")
    line.result(copy_call(TO, BASE + 3 * PAGE, 2 * PAGE, "2048"), v.copy(BASE + 3 * PAGE, 2 * PAGE, fill_pat(2, 3), TO))
    return line.see("tags", v.tags_of(0, 4)).text()


@case("part.end_of_slot_from")
def _():
    v = SimVm()
    v.put_tags(0, 4, 1)
    buf = bytearray(b"\xee" * (16 * TAGS_PER_PAGE))
    line = Line("part.end_of_slot_from", "mte memfd slots=4")
    line.result(copy_call(FROM, BASE + 2 * PAGE, 3 * PAGE, "3072"), v.copy(BASE + 2 * PAGE, 3 * PAGE, buf, FROM))
    return line.see("buf", describe(buf[: 3 * TAGS_PER_PAGE])).text()


@case("part.past_the_end")
def _():
    v = SimVm()
    line = Line("part.past_the_end", "mte memfd slots=4")
    return line.result(
        copy_call(TO, BASE + 4 * PAGE, PAGE, "1024"), v.copy(BASE + 4 * PAGE, PAGE, bytearray(1024), TO)
    ).text()


@case("part.whole_slot_and_beyond_to")
def _():
    v = SimVm()
    line = Line("part.whole_slot_and_beyond_to", "mte memfd slots=4")
    line.result(copy_call(TO, BASE, 8 * PAGE, "4096"), v.copy(BASE, 8 * PAGE, fill_pat(8, 5)[:4096], TO))
    return line.see("tags", v.tags_of(0, 4)).text()


@case("part.across_two_slots_to")
def _():
    v = SimVm((4, 4))
    line = Line("part.across_two_slots_to", "mte memfd slots=4+4")
    line.result(copy_call(TO, BASE + 3 * PAGE, 2 * PAGE, "2048"), v.copy(BASE + 3 * PAGE, 2 * PAGE, fill_pat(2, 9), TO))
    return line.see("tags", v.tags_of(2, 4)).text()


@case("part.across_two_slots_from")
def _():
    v = SimVm((4, 4))
    v.put_tags(0, 8, 2)
    buf = bytearray(b"\xee" * (4 * TAGS_PER_PAGE))
    line = Line("part.across_two_slots_from", "mte memfd slots=4+4")
    line.result(copy_call(FROM, BASE + 2 * PAGE, 4 * PAGE, "4096"), v.copy(BASE + 2 * PAGE, 4 * PAGE, buf, FROM))
    return line.see("buf", describe(buf)).text()


@case("part.two_slots_and_beyond_to")
def _():
    v = SimVm((4, 4))
    line = Line("part.two_slots_and_beyond_to", "mte memfd slots=4+4")
    line.result(copy_call(TO, BASE, 10 * PAGE, "10240"), v.copy(BASE, 10 * PAGE, fill_pat(10, 4), TO))
    return line.see("tags", v.tags_of(0, 8)).text()


@case("part.hole_between_slots_to")
def _():
    # hosts/ lays memslots side by side; a hole answers as the end of RAM does
    v = SimVm((4,))
    line = Line("part.hole_between_slots_to", "mte memfd slots=4,hole=4,4")
    line.result(
        copy_call(TO, BASE + 2 * PAGE, 8 * PAGE, "8192"), v.copy(BASE + 2 * PAGE, 8 * PAGE, fill_pat(12, 6)[:8192], TO)
    )
    return line.see("tags", v.tags_of(0, 4)).text()


# -- user buffers that fault partway ---------------------------------------------------
FAULT_CASES = [
    ("fault.to_none_readable", TO, 1, 0, True),
    ("fault.to_mid_page0", TO, 1, 100, True),
    ("fault.to_at_page1", TO, 2, 256, True),
    ("fault.to_mid_page1", TO, 2, 384, True),
    ("fault.to_mid_page2_of_4", TO, 4, 640, True),
    ("fault.to_untouched_mid_page1", TO, 2, 384, False),
    ("fault.to_untouched_none_readable", TO, 2, 0, False),
    ("fault.from_none_readable", FROM, 1, 0, True),
    ("fault.from_mid_page0", FROM, 1, 100, True),
    ("fault.from_at_page1", FROM, 2, 256, True),
    ("fault.from_mid_page1", FROM, 2, 384, True),
    ("fault.from_untouched_mid_page1", FROM, 2, 384, False),
    ("fault.from_untouched_at_page2", FROM, 3, 512, False),
    ("fault.from_untouched_none_readable", FROM, 2, 0, False),
]


def _fault_case(name, flags, npages, readable, pretagged):
    """The buffer is exactly its readable bytes: the kernel meets the guard
    page where the Python buffer ends."""

    def run():
        v = SimVm()
        if pretagged:
            v.put_tags(0, 4, 1)
        buf = fill_pat(8, 8)[:readable] if flags == TO else bytearray(b"\xee" * readable)
        line = Line(name, "mte memfd slots=4 tagged=p1" if pretagged else "mte memfd slots=4")
        line.result(copy_call(flags, BASE, npages * PAGE, f"{readable}+guard"), v.copy(BASE, npages * PAGE, buf, flags))
        line.see("res", v.residency(0, 4))
        if flags == FROM:
            line.see("buf", describe(buf) if readable else "-")
        line.see("tags", v.tags_of(0, 4))
        v.close()
        return line.text()

    return run


for _c in FAULT_CASES:
    CASES[_c[0]] = _fault_case(*_c)


def _null_buffer(name, flags):
    def run():
        v = SimVm()
        line = Line(name, "mte memfd slots=4")
        line.result(copy_call(flags, BASE, PAGE, "NULL"), v.copy(BASE, PAGE, bytearray(), flags))
        line.see("res", v.residency(0, 4)).see("tags", v.tags_of(0, 4))
        return line.text()

    return run


CASES["fault.to_null_buffer"] = _null_buffer("fault.to_null_buffer", TO)
CASES["fault.from_null_buffer"] = _null_buffer("fault.from_null_buffer", FROM)


# -- untouched pages ------------------------------------------------------------------------
def _untouched(name, flags):
    def run():
        v = SimVm()
        buf = fill_pat(1, 2) + b"\xee" * TAGS_PER_PAGE
        before = v.residency(0, 4)
        line = Line(name, "mte memfd slots=4")
        line.result(copy_call(flags, BASE + PAGE, PAGE, "256"), v.copy(BASE + PAGE, PAGE, buf, flags))
        line.see("res_before", before).see("res", v.residency(0, 4))
        if flags == FROM:
            line.see("buf", describe(buf[:TAGS_PER_PAGE]))
        line.see("tags", v.tags_of(0, 4)).see("res_after_read", v.residency(0, 4))
        return line.text()

    return run


CASES["untouched.memfd_to"] = _untouched("untouched.memfd_to", TO)
CASES["untouched.memfd_from"] = _untouched("untouched.memfd_from", FROM)


@case("untouched.memfd_vmm_read_then_from")
def _():
    v = SimVm()
    bytes(v.plain.read(0, 1))  # the VMM loads one byte through its plain mapping
    buf = bytearray(TAGS_PER_PAGE)
    line = Line("untouched.memfd_vmm_read_then_from", "mte memfd slots=4")
    line.result(copy_call(FROM, BASE, PAGE, "256"), v.copy(BASE, PAGE, buf, FROM))
    return line.see("buf", describe(buf)).see("res", v.residency(0, 4)).text()


@case("untouched.tags_then_vmm_data")
def _():
    v = SimVm()
    v.put_tags(0, 1, 3)
    v.plain.write(0, b"\xab" * PAGE)
    buf = bytearray(TAGS_PER_PAGE)
    line = Line("untouched.tags_then_vmm_data", "mte memfd slots=4")
    line.result(copy_call(FROM, BASE, PAGE, "256"), v.copy(BASE, PAGE, buf, FROM))
    return line.see("buf", describe(buf)).see("data", v.data_of(0, 1)).text()


@case("untouched.vmm_data_then_to")
def _():
    v = SimVm()
    v.plain.write(0, b"\xab" * PAGE)
    line = Line("untouched.vmm_data_then_to", "mte memfd slots=4")
    line.result(copy_call(TO, BASE, PAGE, "256"), v.copy(BASE, PAGE, fill_pat(1, 3), TO))
    return line.see("data", v.data_of(0, 1)).see("tags", v.tags_of(0, 1)).text()


# -- memslot backings (hosts/ has one: a memfd) ---------------------------------------------
def _backing_memfd(name, cap_after_slot):
    def run():
        # hosts/ makes the memslots with the VM; enabling MTE after them is the
        # cap_after_slot order, and before is the same in hosts/.
        v = SimVm(mte=False)
        setup = f"{'cap-after-slot' if cap_after_slot else 'mte'} memfd slots=4"
        line = Line(name, setup).result("SET_USER_MEMORY_REGION(slot=0)", 0)
        v.vm.enable_mte()
        if cap_after_slot:
            line.see("enable_cap", 0)
        line.see("to", rv(v.put_tags(0, 1, 5))).see("tags", v.tags_of(0, 1))
        return line.text()

    return run


CASES["backing.memfd"] = _backing_memfd("backing.memfd", False)
CASES["backing.memfd_cap_after_slot"] = _backing_memfd("backing.memfd_cap_after_slot", True)


@case("backing.memfd_prot_mte")
def _():
    # the memslot's own mapping PROT_MTE: in hosts/, the VMM's PROT_MTE mapping
    v = SimVm()
    line = Line("backing.memfd_prot_mte", "mte memfd(PROT_MTE) slots=4").result("SET_USER_MEMORY_REGION(slot=0)", 0)
    v.stg_pages(0, 1, 4)
    return line.see("tags", v.tags_of(0, 2)).text()


# -- KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) ------------------------------------------------------------
def _enable(v: SimVm) -> Result:
    try:
        v.vm.enable_mte()
        return 0
    except KernelError as e:
        return e.errno_name


@case("cap.fresh_vm")
def _():
    return Line("cap.fresh_vm", "vm").result("ENABLE_CAP(MTE)", _enable(SimVm(mte=False))).text()


@case("cap.twice")
def _():
    return Line("cap.twice", "vm mte").result("ENABLE_CAP(MTE)", _enable(SimVm())).text()


@case("cap.after_memslot")
def _():
    v = SimVm(mte=False)
    line = Line("cap.after_memslot", "vm memfd slots=4").result("ENABLE_CAP(MTE)", _enable(v))
    return line.see("to", rv(v.put_tags(0, 1, 5))).see("tags", v.tags_of(0, 1)).text()


@case("cap.after_vcpu")
def _():
    v = SimVm(mte=False)
    vcpu = v.vm.create_vcpu()
    line = Line("cap.after_vcpu", "vm memfd slots=4 vcpus=1").result("ENABLE_CAP(MTE)", _enable(v))
    line.see("vcpu", vcpu).see("from", rv(v.copy(BASE, PAGE, bytearray(TAGS_PER_PAGE), FROM)))
    return line.text()


@case("cap.then_vcpu_then_again")
def _():
    v = SimVm()
    v.vm.create_vcpu()
    line = Line("cap.then_vcpu_then_again", "mte memfd slots=4 vcpus=1").result("ENABLE_CAP(MTE)", _enable(v))
    return line.see("from", rv(v.copy(BASE, PAGE, bytearray(TAGS_PER_PAGE), FROM))).text()


# -- the ioctl and dirty logging -----------------------------------------------------------------
def _dirty(name, what):
    def run():
        v = SimVm()
        if what != "to_untouched":
            v.put_tags(0, 4, 1)
        v.vm.enable_dirty_logging(0)
        first = v.dirty_log(0)
        setup = (
            "mte memfd slots=4 +LOG_DIRTY_PAGES"
            if what == "to_untouched"
            else "mte memfd slots=4 tagged=p1 +LOG_DIRTY_PAGES"
        )
        line = Line(name, setup)
        buf = fill_pat(1, 6)
        if what in ("to", "to_untouched"):
            line.result(copy_call(TO, BASE + PAGE, PAGE, "256"), v.copy(BASE + PAGE, PAGE, buf, TO))
        elif what == "from":
            line.result(copy_call(FROM, BASE + PAGE, PAGE, "256"), v.copy(BASE + PAGE, PAGE, buf, FROM))
        elif what == "vmm_store":
            v.plain.write(PAGE, b"\xcd" * PAGE)
            line.result("VMM store(page=1)", 0)
        else:
            v.stg_pages(1, 1, 6)
            line.result("VMM STG(page=1)", 0)
        line.see("log_on", 0).see("log_before", first).see("log", v.dirty_log(0)).see("tags", v.tags_of(1, 1))
        return line.text()

    return run


for _name, _what in (
    ("dirty.to_guest", "to"),
    ("dirty.from_guest", "from"),
    ("dirty.vmm_data_store", "vmm_store"),
    ("dirty.vmm_stg", "vmm_stg"),
    ("dirty.to_guest_untouched", "to_untouched"),
):
    CASES[_name] = _dirty(_name, _what)


@case("dirty.to_guest_other_slot_logging")
def _():
    v = SimVm((4, 4))
    v.vm.enable_dirty_logging(1)
    line = Line("dirty.to_guest_other_slot_logging", "mte memfd slots=4+4 slot1+LOG_DIRTY_PAGES")
    line.result(copy_call(TO, BASE, PAGE, "256"), v.copy(BASE, PAGE, fill_pat(1, 6), TO))
    return line.see("tags", v.tags_of(0, 1)).text()


@case("dirty.to_guest_after_log_off")
def _():
    v = SimVm()
    v.vm.enable_dirty_logging(0)
    v.vm.disable_dirty_logging(0)
    line = Line("dirty.to_guest_after_log_off", "mte memfd slots=4 +LOG_DIRTY_PAGES -LOG_DIRTY_PAGES")
    line.result(copy_call(TO, BASE, PAGE, "256"), v.copy(BASE, PAGE, fill_pat(1, 6), TO))
    return line.see("tags", v.tags_of(0, 1)).text()


@case("dirty.to_guest_len_0_logging")
def _():
    v = SimVm()
    v.vm.enable_dirty_logging(0)
    line = Line("dirty.to_guest_len_0_logging", "mte memfd slots=4 +LOG_DIRTY_PAGES")
    line.result(copy_call(TO, BASE, 0, "256"), v.copy(BASE, 0, fill_pat(1, 6), TO))
    return line.see("tags", v.tags_of(0, 1)).text()


@case("dirty.log_not_enabled")
def _():
    v = SimVm()
    try:
        r = (v.vm.get_dirty_log(0), 0)[1]
    except KernelError as e:
        r = e.errno_name
    return Line("dirty.log_not_enabled", "mte memfd slots=4").result("GET_DIRTY_LOG(slot=0)", r).text()


# -- tags through the VMM's PROT_MTE alias against the ioctl ---------------------------------------
@case("alias.stg_then_from")
def _():
    v = SimVm()
    v.stg_pages(0, 1, 4)
    buf = bytearray(2 * TAGS_PER_PAGE)
    line = Line("alias.stg_then_from", "mte memfd slots=4 alias")
    line.result(copy_call(FROM, BASE, 2 * PAGE, "512"), v.copy(BASE, 2 * PAGE, buf, FROM))
    return line.see("buf", describe(buf)).see("res", v.residency(0, 4)).text()


@case("alias.to_then_ldg")
def _():
    v = SimVm()
    line = Line("alias.to_then_ldg", "mte memfd slots=4 alias")
    line.result(copy_call(TO, BASE, 2 * PAGE, "512"), v.copy(BASE, 2 * PAGE, fill_pat(2, 9), TO))
    return line.see("ldg", v.ldg_pages(0, 3)).see("res", v.residency(0, 4)).text()


@case("alias.ldg_untouched")
def _():
    v = SimVm()
    line = Line("alias.ldg_untouched", "mte memfd slots=4 alias").result("VMM LDG(page=2)", 0)
    line.see("ldg", v.ldg_pages(2, 1))
    return line.see("res", v.residency(0, 4)).see("tags", v.tags_of(2, 1)).text()


@case("alias.stg_untouched_populates")
def _():
    v = SimVm()
    line = Line("alias.stg_untouched_populates", "mte memfd slots=4 alias")
    v.stg_pages(3, 1, 2)
    line.result("VMM STG(page=3)", 0)
    return line.see("res", v.residency(0, 4)).see("tags", v.tags_of(3, 1)).text()


@case("alias.vmm_data_then_ldg")
def _():
    v = SimVm()
    v.plain.write(0, b"\xab" * PAGE)
    line = Line("alias.vmm_data_then_ldg", "mte memfd slots=4 alias").result("VMM LDG(page=0)", 0)
    return line.see("ldg", v.ldg_pages(0, 1)).see("data", v.data_of(0, 1)).text()


@case("alias.stg_then_to")
def _():
    v = SimVm()
    v.stg_pages(0, 1, 2)
    line = Line("alias.stg_then_to", "mte memfd slots=4 alias")
    line.result(copy_call(TO, BASE, PAGE, "256"), v.copy(BASE, PAGE, fill_pat(1, 12), TO))
    return line.see("ldg", v.ldg_pages(0, 1)).text()


@case("alias.stg_one_granule")
def _():
    v = SimVm()
    v.alias.store_tag_range(5 * GRANULE, GRANULE, 9)
    buf = bytearray(TAGS_PER_PAGE)
    line = Line("alias.stg_one_granule", "mte memfd slots=4 alias")
    line.result(copy_call(FROM, BASE, PAGE, "256"), v.copy(BASE, PAGE, buf, FROM))
    return line.see("buf", describe(buf)).text()


def _dirty_anon(name, flags):
    def run():
        # private anonymous RAM in the kernel; hosts/ has a memfd, which this
        # rule does not look at (only residency would differ, not observed)
        v = SimVm()
        v.put_tags(0, 4, 1)
        v.vm.enable_dirty_logging(0)
        first = v.dirty_log(0)
        line = Line(name, "mte anon slots=4 tagged=p1 +LOG_DIRTY_PAGES")
        line.result(copy_call(flags, BASE + PAGE, PAGE, "256"), v.copy(BASE + PAGE, PAGE, fill_pat(1, 6), flags))
        line.see("log_on", 0).see("log_before", first).see("log", v.dirty_log(0)).see("tags", v.tags_of(1, 1))
        return line.text()

    return run


CASES["dirty.anon_to_guest"] = _dirty_anon("dirty.anon_to_guest", TO)
CASES["dirty.anon_from_guest"] = _dirty_anon("dirty.anon_from_guest", FROM)
