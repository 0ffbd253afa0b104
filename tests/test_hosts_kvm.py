"""The kvm backend, as far as a machine without arm64 KVM can test it: the
ioctl numbers and structure layouts against the kernel's own uapi headers
(compiled with the aarch64 cross compiler), register ids and names, the
dirty-bitmap conversion, the guest program and helper builds, and the one
line `--host kvm` prints where it cannot run.  The rest runs in the lab
(tests/test_lab.py)."""

import ctypes
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hosts import HostUnavailable, SimulatedHost, make_host
from hosts.kvm import build as kvm_build
from hosts.kvm import check_kvm, uapi
from hosts.kvm.host import GuestProgram
from hosts.kvm.kvm import bits_to_bytes
from hosts.kvm.vcpu import REP_FAULT_ESR, REP_GRANULES, REP_MISMATCHES, REP_OPS, GuestReports

REPO = Path(__file__).resolve().parent.parent
CROSS_GCC = "aarch64-linux-gnu-gcc"

UAPI_PROBE = r"""
#include <linux/kvm.h>
#include <stddef.h>
unsigned long v[] = {
  KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION, KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU,
  KVM_GET_DIRTY_LOG, KVM_SET_USER_MEMORY_REGION, KVM_RUN, KVM_ENABLE_CAP, KVM_GET_ONE_REG,
  KVM_SET_ONE_REG, KVM_ARM_VCPU_INIT, KVM_ARM_PREFERRED_TARGET, KVM_GET_REG_LIST,
  KVM_ARM_MTE_COPY_TAGS, KVM_CLEAR_DIRTY_LOG,
  KVM_CAP_ARM_MTE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_ARM_VCPU_PSCI_0_2, KVM_MEM_LOG_DIRTY_PAGES,
  KVM_EXIT_MMIO, KVM_EXIT_INTR, KVM_EXIT_SYSTEM_EVENT, KVM_ARM_TAGS_FROM_GUEST, KVM_API_VERSION,
  sizeof(struct kvm_arm_copy_mte_tags), sizeof(struct kvm_userspace_memory_region),
  sizeof(struct kvm_enable_cap), sizeof(struct kvm_vcpu_init), sizeof(struct kvm_clear_dirty_log),
  offsetof(struct kvm_run, immediate_exit), offsetof(struct kvm_run, exit_reason),
  offsetof(struct kvm_run, mmio.phys_addr), offsetof(struct kvm_run, mmio.data),
  offsetof(struct kvm_run, mmio.len), offsetof(struct kvm_run, mmio.is_write),
  KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.pc),
  KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.pstate),
  KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.regs[5]),
  KVM_REG_ARM64 | KVM_REG_SIZE_U128 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(fp_regs.vregs[31]),
  KVM_REG_ARM64 | KVM_REG_SIZE_U32 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(fp_regs.fpsr),
  KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(spsr[4]),
  KVM_REG_ARM_TIMER_CNT, ARM64_SYS_REG(3, 0, 1, 0, 6),
};
"""


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory):
    """The values above as the kernel's headers for arm64 define them."""
    if not shutil.which(CROSS_GCC):
        pytest.skip(f"{CROSS_GCC} (gcc-aarch64-linux-gnu) is not installed")
    src = tmp_path_factory.mktemp("uapi") / "uapi.c"
    src.write_text(UAPI_PROBE)
    asm = subprocess.run([CROSS_GCC, "-S", "-o", "-", str(src)], check=True, capture_output=True, text=True).stdout
    return [int(v) for v in re.findall(r"\.xword\s+(\d+)", asm)]


def test_ioctl_numbers_and_layouts_match_the_kernel_headers(kernel_values):
    ours = [
        uapi.KVM_GET_API_VERSION,
        uapi.KVM_CREATE_VM,
        uapi.KVM_CHECK_EXTENSION,
        uapi.KVM_GET_VCPU_MMAP_SIZE,
        uapi.KVM_CREATE_VCPU,
        uapi.KVM_GET_DIRTY_LOG,
        uapi.KVM_SET_USER_MEMORY_REGION,
        uapi.KVM_RUN,
        uapi.KVM_ENABLE_CAP,
        uapi.KVM_GET_ONE_REG,
        uapi.KVM_SET_ONE_REG,
        uapi.KVM_ARM_VCPU_INIT,
        uapi.KVM_ARM_PREFERRED_TARGET,
        uapi.KVM_GET_REG_LIST,
        uapi.KVM_ARM_MTE_COPY_TAGS,
        uapi.KVM_CLEAR_DIRTY_LOG,
        uapi.KVM_CAP_ARM_MTE,
        uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        uapi.KVM_ARM_VCPU_PSCI_0_2,
        uapi.KVM_MEM_LOG_DIRTY_PAGES,
        uapi.KVM_EXIT_MMIO,
        uapi.KVM_EXIT_INTR,
        uapi.KVM_EXIT_SYSTEM_EVENT,
        uapi.KVM_ARM_TAGS_FROM_GUEST,
        uapi.KVM_API_VERSION,
        ctypes.sizeof(uapi.CopyMteTags),
        ctypes.sizeof(uapi.UserspaceMemoryRegion),
        ctypes.sizeof(uapi.EnableCap),
        ctypes.sizeof(uapi.VcpuInit),
        ctypes.sizeof(uapi.ClearDirtyLogArg),
        uapi.KvmRun.immediate_exit.offset,
        uapi.KvmRun.exit_reason.offset,
        uapi.KvmRun.u.offset + uapi.MmioExit.phys_addr.offset,
        uapi.KvmRun.u.offset + uapi.MmioExit.data.offset,
        uapi.KvmRun.u.offset + uapi.MmioExit.len.offset,
        uapi.KvmRun.u.offset + uapi.MmioExit.is_write.offset,
        uapi.REG_PC,
        uapi.REG_PSTATE,
        uapi.reg_x(5),
        uapi.core_reg(336 + 31 * 16, uapi.KVM_REG_SIZE_U128),
        uapi.core_reg(848, uapi.KVM_REG_SIZE_U32),
        uapi.core_reg(288 + 4 * 8),
        uapi.REG_TIMER_CNT,
        uapi.sys_reg(*uapi.SYSREGS["GCR_EL1"]),
    ]
    assert ours == kernel_values


def test_register_names_and_sizes():
    assert uapi.reg_name(uapi.REG_PC) == "pc"
    assert uapi.reg_name(uapi.reg_x(30)) == "x30"
    assert uapi.reg_name(uapi.core_reg(336 + 16, uapi.KVM_REG_SIZE_U128)) == "v1"
    assert uapi.reg_size(uapi.core_reg(336 + 16, uapi.KVM_REG_SIZE_U128)) == 16
    assert uapi.reg_name(uapi.core_reg(852, uapi.KVM_REG_SIZE_U32)) == "fpcr"
    assert uapi.reg_name(uapi.sys_reg(3, 0, 5, 6, 1)) == "TFSRE0_EL1"
    assert uapi.reg_name(uapi.sys_reg(3, 0, 0, 0, 5)) == "S3_0_C0_C0_5"
    fw = uapi.KVM_REG_ARM64 | uapi.KVM_REG_SIZE_U64 | (0x14 << 16)
    assert uapi.reg_name(fw) == hex(fw)
    for name in uapi.MTE_SYSREGS:
        assert uapi.reg_name(uapi.sys_reg(*uapi.SYSREGS[name])) == name


def test_reg_list_parsing():
    ids = [uapi.REG_PC, uapi.reg_x(0), uapi.REG_TIMER_CNT]
    raw = len(ids).to_bytes(8, "little") + b"".join(i.to_bytes(8, "little") for i in ids)
    assert uapi.parse_reg_list(raw) == ids
    with pytest.raises(ValueError, match="says 3 ids"):
        uapi.parse_reg_list(raw[:-8])


def test_dirty_bitmap_bits_become_one_byte_a_page():
    assert bits_to_bytes(bytes(8), 64) == bytes(64)
    bitmap = bytes([0b0000_0101, 0, 0, 0, 0, 0, 0, 0x80])
    pages = bits_to_bytes(bitmap, 64)
    assert [i for i, b in enumerate(pages) if b] == [0, 2, 63]
    assert len(bits_to_bytes(bitmap, 60)) == 60


def test_guest_reports_follow_the_mmio_protocol():
    r = GuestReports()
    r.resumed()
    r.write(REP_OPS, 400)
    r.write(REP_GRANULES, 65536)
    r.write(REP_MISMATCHES, 3)
    assert r.wait_check_since_resume(0) == {**r.checks[0], "mismatches": 3, "granules_checked": 65536, "ops": 400}
    r.resumed()
    assert r.wait_check_since_resume(0.01) is None  # none since the second resume
    r.write(REP_FAULT_ESR, 0x96000000)
    assert r.fault["esr"] == 0x96000000


def test_a_guest_program_has_no_state_outside_the_guest():
    p = GuestProgram("allocator", 1, {})
    assert p.get_state() == {} and p.device_state() == {}
    with pytest.raises(ValueError):
        p.set_state({"rng": 1})
    with pytest.raises(ValueError, match="runs workloads"):
        GuestProgram("stream", 1, {})


def test_make_host_picks_the_backend():
    host = make_host("sim", 1 << 20, workload="idle", rate=0)
    try:
        assert isinstance(host, SimulatedHost) and host.kind == "sim"
        assert host.refresh_tag_view() == [] and host.guest_report(0) is None
    finally:
        host.close()
    with pytest.raises(ValueError, match="unknown host backend"):
        make_host("xen", 1 << 20)


def test_check_kvm_without_dev_kvm(tmp_path):
    with pytest.raises(HostUnavailable, match="no .* on this machine"):
        check_kvm(str(tmp_path / "kvm"))


@pytest.mark.skipif(platform.machine() == "aarch64", reason="an arm64 machine may have MTE")
@pytest.mark.parametrize(
    "command", [["source", "--connect", "127.0.0.1:9"], ["dest", "--listen", "127.0.0.1:0"], ["run"], ["validate"]]
)
def test_host_kvm_here_stops_with_one_line(command):
    run = subprocess.run(
        [sys.executable, "-m", "migrate", *command, "--host", "kvm", "--ram", "64MiB"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("mte-migrate: error: --host kvm: ")
    assert "KVM_CAP_ARM_MTE" in lines[0] or "no /dev/kvm" in lines[0]


@pytest.mark.skipif(kvm_build.missing_tools("aarch64-linux-gnu-") != [], reason="no aarch64 binutils and gcc")
def test_guest_program_and_helper_build_small(tmp_path):
    guest, helper = kvm_build.build(tmp_path, "aarch64-linux-gnu-")
    assert guest.stat().st_size <= 16 << 10  # code, vectors and one page table
    code = guest.read_bytes()
    assert code[:4] != b"\0\0\0\0"  # _start is first: the vCPU's PC is the start of RAM
    dump = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(helper)], check=True, capture_output=True, text=True
    ).stdout
    assert "ldg" in dump and "stg" in dump
    objdump = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-D", "-b", "binary", "-m", "aarch64", str(guest)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for insn in ("irg", "st2g", "ldg", "msr\tsctlr_el1"):
        assert insn in objdump, insn


def test_a_verdict_after_a_moment_is_a_check_begun_after_it():
    r = GuestReports()
    r.resumed()

    def check(at, mismatches):
        r.write(REP_GRANULES, 256)
        r.write(REP_MISMATCHES, mismatches)
        r.checks[-1]["at"] = at

    check(10.0, 0)  # before the moment
    check(20.0, 1)  # ended after it, may have begun before
    assert r.wait_check_since_resume(0.01, whole_after=15.0) is None
    check(21.0, 2)
    assert r.wait_check_since_resume(0, whole_after=15.0)["mismatches"] == 2
    assert r.wait_check_since_resume(0)["mismatches"] == 0


def test_a_verdict_takes_a_check_from_every_vcpu_and_adds_them_up():
    r = GuestReports(2)
    r.resumed()
    # the two vCPUs' writes interleave: each keeps its own pending values
    r.write(REP_OPS, 10, vcpu=0)
    r.write(REP_OPS, 20, vcpu=1)
    r.write(REP_GRANULES, 256, vcpu=1)
    r.write(REP_GRANULES, 512, vcpu=0)
    r.write(REP_MISMATCHES, 1, vcpu=0)
    assert r.wait_check_since_resume(0.01) is None  # vCPU 1 has not reported yet
    r.write(REP_MISMATCHES, 0, vcpu=1)
    got = r.wait_check_since_resume(0)
    assert (got["vcpus"], got["mismatches"], got["granules_checked"], got["ops"]) == (2, 1, 768, 30)
    r.write(REP_OPS, 25, vcpu=1)
    r.write(REP_MISMATCHES, 0, vcpu=1)
    assert r.last_checks()["ops"] == 35
