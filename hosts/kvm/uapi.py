"""The Linux KVM user API for arm64, as ctypes: ioctl numbers, structures,
capabilities and register ids (include/uapi/linux/kvm.h and
arch/arm64/include/uapi/asm/kvm.h).  Pure data and arithmetic: importable,
and tested, on any machine."""

import ctypes

# -- ioctl numbers (asm-generic/ioctl.h, which arm64 uses) ---------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, KVMIO, nr, 0)


def _iow(nr: int, struct) -> int:
    return _ioc(_IOC_WRITE, KVMIO, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct) -> int:
    return _ioc(_IOC_READ, KVMIO, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, KVMIO, nr, ctypes.sizeof(struct))


KVMIO = 0xAE


# -- structures ----------------------------------------------------------------
class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class DirtyLogArg(ctypes.Structure):
    """struct kvm_dirty_log: the bitmap pointer is a union with a u64 pad."""

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


class ClearDirtyLogArg(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    ]


class EnableCap(ctypes.Structure):
    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class VcpuInit(ctypes.Structure):
    _fields_ = [("target", ctypes.c_uint32), ("features", ctypes.c_uint32 * 7)]


class OneReg(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


class RegListHeader(ctypes.Structure):
    """struct kvm_reg_list without its flexible array of u64 ids."""

    _fields_ = [("n", ctypes.c_uint64)]


class CopyMteTags(ctypes.Structure):
    _fields_ = [
        ("guest_ipa", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 2),
    ]


class MmioExit(ctypes.Structure):
    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class SystemEventExit(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class _ExitUnion(ctypes.Union):
    _fields_ = [
        ("mmio", MmioExit),
        ("system_event", SystemEventExit),
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("padding", ctypes.c_uint8 * 256),
    ]


class KvmRun(ctypes.Structure):
    """The head of struct kvm_run, the vCPU's shared page (mmap of the vCPU fd)."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("u", _ExitUnion),
    ]


# -- ioctls --------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, DirtyLogArg)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_RUN = _io(0x80)
KVM_ENABLE_CAP = _iow(0xA3, EnableCap)
KVM_GET_ONE_REG = _iow(0xAB, OneReg)
KVM_SET_ONE_REG = _iow(0xAC, OneReg)
KVM_ARM_VCPU_INIT = _iow(0xAE, VcpuInit)
KVM_ARM_PREFERRED_TARGET = _ior(0xAF, VcpuInit)
KVM_GET_REG_LIST = _iowr(0xB0, RegListHeader)
KVM_ARM_MTE_COPY_TAGS = _ior(0xB4, CopyMteTags)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ClearDirtyLogArg)

KVM_API_VERSION = 12

# -- capabilities, flags, exit reasons -------------------------------------------
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_ARM_MTE = 205
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1

KVM_EXIT_MMIO = 6
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

# -- register ids ----------------------------------------------------------------
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0_0000_0000_0000
KVM_REG_SIZE_U32 = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_SIZE_U128 = 0x0040_0000_0000_0000
KVM_REG_ARM_COPROC_MASK = 0x0000_0000_0FFF_0000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def reg_size(reg_id: int) -> int:
    """Bytes a register id's value takes (1 << the size field)."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def core_reg(byte_offset: int, size: int = KVM_REG_SIZE_U64) -> int:
    """Id of the core register at ``byte_offset`` in struct kvm_regs."""
    return KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | (byte_offset // 4)


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    return (
        KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
    )


# struct kvm_regs: user_pt_regs {x0..x30, sp, pc, pstate}, sp_el1, elr_el1,
# spsr[5], then user_fpsimd_state {vregs[32] (16-byte aligned), fpsr, fpcr}
_CORE_SP, _CORE_PC, _CORE_PSTATE, _CORE_SP_EL1, _CORE_ELR_EL1, _CORE_SPSR = 248, 256, 264, 272, 280, 288
_CORE_VREGS, _CORE_FPSR, _CORE_FPCR = 336, 848, 852
REG_PC = core_reg(_CORE_PC)
REG_SP = core_reg(_CORE_SP)
REG_PSTATE = core_reg(_CORE_PSTATE)


def reg_x(n: int) -> int:
    return core_reg(8 * n)


#: system registers by name: the ones the guest programs set, and MTE's
SYSREGS = {
    "SCTLR_EL1": (3, 0, 1, 0, 0),
    "GCR_EL1": (3, 0, 1, 0, 6),
    "RGSR_EL1": (3, 0, 1, 0, 5),
    "TTBR0_EL1": (3, 0, 2, 0, 0),
    "TTBR1_EL1": (3, 0, 2, 0, 1),
    "TCR_EL1": (3, 0, 2, 0, 2),
    "ESR_EL1": (3, 0, 5, 2, 0),
    "TFSR_EL1": (3, 0, 5, 6, 0),
    "TFSRE0_EL1": (3, 0, 5, 6, 1),
    "FAR_EL1": (3, 0, 6, 0, 0),
    "MAIR_EL1": (3, 0, 10, 2, 0),
    "VBAR_EL1": (3, 0, 12, 0, 0),
    "CNTKCTL_EL1": (3, 0, 14, 1, 0),
    "TPIDR_EL1": (3, 0, 13, 0, 4),
    "CNTV_CTL_EL0": (3, 3, 14, 3, 1),
    "CNTV_CVAL_EL0": (3, 3, 14, 0, 2),
    "CNTVCT_EL0": (3, 3, 14, 3, 2),
    "CNTPCT_EL0": (3, 3, 14, 0, 1),
}
_SYSREG_BY_ID = {sys_reg(*enc): name for name, enc in SYSREGS.items()}
#: the virtual and physical counters: read one and it has moved; a VMM that
#: sets one sets an offset.  Left out of the migrated state (docs/LAB.md).
REG_TIMER_CNT = sys_reg(*SYSREGS["CNTVCT_EL0"])
REG_PTIMER_CNT = sys_reg(*SYSREGS["CNTPCT_EL0"])
COUNTERS = (REG_TIMER_CNT, REG_PTIMER_CNT)
MTE_SYSREGS = ("GCR_EL1", "RGSR_EL1", "TFSR_EL1", "TFSRE0_EL1")


def reg_name(reg_id: int) -> str:
    """A readable name for a register id: x0..x30, sp, pc, pstate, v0..v31,
    a system register's name or its encoding, else the id in hex."""
    if reg_id & ~KVM_REG_SIZE_MASK & 0xFFFF_FFFF_FFFF_0000 == KVM_REG_ARM64 | KVM_REG_ARM_CORE:
        off = (reg_id & 0xFFFF) * 4
        if off < _CORE_SP:
            return f"x{off // 8}"
        fixed = {
            _CORE_SP: "sp",
            _CORE_PC: "pc",
            _CORE_PSTATE: "pstate",
            _CORE_SP_EL1: "sp_el1",
            _CORE_ELR_EL1: "elr_el1",
            _CORE_FPSR: "fpsr",
            _CORE_FPCR: "fpcr",
        }
        if off in fixed:
            return fixed[off]
        if _CORE_SPSR <= off < _CORE_SPSR + 40:
            return f"spsr{(off - _CORE_SPSR) // 8}"
        if _CORE_VREGS <= off < _CORE_FPSR:
            return f"v{(off - _CORE_VREGS) // 16}"
    if reg_id & KVM_REG_ARM_COPROC_MASK == KVM_REG_ARM64_SYSREG and reg_id & 0xFF00_0000_0000_0000 == KVM_REG_ARM64:
        name = _SYSREG_BY_ID.get(reg_id)
        if name:
            return name
        enc = reg_id & 0xFFFF
        return f"S{enc >> 14}_{(enc >> 11) & 7}_C{(enc >> 7) & 15}_C{(enc >> 3) & 15}_{enc & 7}"
    return f"{reg_id:#x}"


def parse_reg_list(raw: bytes) -> list[int]:
    """The ids of a KVM_GET_REG_LIST answer (u64 n, then n u64 ids)."""
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 + 8 * n:
        raise ValueError(f"register list says {n} ids but holds {(len(raw) - 8) // 8}")
    return [int.from_bytes(raw[8 + 8 * i : 16 + 8 * i], "little") for i in range(n)]
