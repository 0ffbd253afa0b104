"""The real Linux KVM backend (arm64 with MTE), through ctypes.

``check_kvm()`` says in one line why this machine cannot run it; the
modules below import on any machine (their tests run on x86 too)."""

import os
import platform

from ..backend import HostUnavailable


def check_kvm(path: str = "/dev/kvm") -> None:
    """Raise HostUnavailable (one line) unless ``path`` is an arm64 KVM
    that offers KVM_CAP_ARM_MTE."""
    from . import uapi
    from .kvm import KernelError, KvmSystem

    if not os.path.exists(path):
        raise HostUnavailable(f"no {path} on this machine (no KVM, or no access to it)")
    try:
        system = KvmSystem(path)
    except OSError as exc:
        raise HostUnavailable(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        mte = system.check(uapi.KVM_CAP_ARM_MTE)
    except KernelError:
        mte = 0
    finally:
        system.close()
    machine = platform.machine()
    if machine not in ("aarch64", "arm64"):
        raise HostUnavailable(f"{path} is {machine} KVM; the kvm backend needs arm64 KVM with KVM_CAP_ARM_MTE")
    if not mte:
        raise HostUnavailable(f"{path} has no KVM_CAP_ARM_MTE (the CPU or the kernel lacks MTE)")


def __getattr__(name):
    if name == "KvmHost":
        from .host import KvmHost

        return KvmHost
    raise AttributeError(name)
