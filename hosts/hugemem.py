"""A tmpfs file whose pages come 2 MiB at a time: guest RAM on huge pages.

A memfd lives on the kernel's internal tmpfs, which gets transparent huge
pages only when the host's ``shmem_enabled`` allows them (often ``never``).
A tmpfs of our own, mounted with ``huge=within_size``, gets them whatever
that setting says (bar ``deny``), as QEMU's anonymous RAM does when it
madvises it.  The mount is never attached to a path: the new mount API
(fsopen, fsconfig, fsmount) gives a mount fd, and an O_TMPFILE opened in it
is a file no one else can name, like a memfd.  The mount fd is kept: through
it the mount can be told to take 4 KiB pages from then on (small_pages).

Mounting needs CAP_SYS_ADMIN.  Without it, a short-lived child process can
enter a user and mount namespace of its own, mount there and pass the file
back over a socket (SCM_RIGHTS); that mount cannot be switched to small
pages afterwards (fspick needs the capability in our own namespace).  When
neither works (an old kernel, no user namespaces, THP not built in), the
caller gets None and uses a memfd.
"""

import ctypes
import os
import socket

_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_FSPICK = 430, 431, 432, 433  # the same on every architecture
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE, _FSCONFIG_CMD_RECONFIGURE = 1, 6, 7
_FSMOUNT_CLOEXEC = 0x1
_FSPICK_CLOEXEC, _FSPICK_EMPTY_PATH = 0x1, 0x8
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
HUGE_PAGE = 2 << 20

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _syscall.restype = ctypes.c_long
    _unshare = _libc.unshare
except (OSError, AttributeError):
    _libc = None


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount_and_open(size: int) -> tuple[int, int]:
    """(file, mount) fds: an O_TMPFILE in a detached tmpfs mount with
    huge=within_size, sized to hold ``size`` bytes.  Raises OSError."""
    fs = _check(_syscall(_SYS_FSOPEN, b"tmpfs", _FSOPEN_CLOEXEC), "fsopen(tmpfs)")
    try:
        limit = str(-(-size // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE).encode()
        for key, value in ((b"huge", b"within_size"), (b"size", limit), (b"nr_inodes", b"4"), (b"mode", b"0700")):
            _check(_syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, key, value, 0), f"fsconfig({key.decode()})")
        _check(_syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig(create)")
        mnt = _check(_syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, 0), "fsmount")
    finally:
        os.close(fs)
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=mnt), mnt
    except OSError:
        os.close(mnt)
        raise


def _open_in_namespace(size: int, wait_s: float = 10.0) -> tuple[int, int]:
    """As _mount_and_open, from a child in a user and mount namespace of its
    own (no privilege needed where user namespaces are allowed)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent_end:
        with child_end:
            pid = os.fork()
            if pid == 0:  # the child: system calls only, then _exit
                code = 1
                try:
                    uid, gid = os.getuid(), os.getgid()
                    _check(_unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare")
                    # map ourselves, or the new file's owner has no id here (EOVERFLOW)
                    for name, text in (
                        ("setgroups", "deny"),
                        ("uid_map", f"{uid} {uid} 1"),
                        ("gid_map", f"{gid} {gid} 1"),
                    ):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                    socket.send_fds(child_end, [b"ok"], list(_mount_and_open(size)))
                    code = 0
                except BaseException as exc:  # noqa: BLE001 -- report and leave, whatever it was
                    try:
                        child_end.send(str(exc).encode()[:200])
                    except OSError:
                        pass
                finally:
                    os._exit(code)
        # child_end is closed here: a child that dies without a word ends the wait
        try:
            parent_end.settimeout(wait_s)
            msg, fds, _, _ = socket.recv_fds(parent_end, 256, 2, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            os.kill(pid, 9)
            raise OSError("the namespace helper did not answer") from None
        finally:
            os.waitpid(pid, 0)
        for fd in fds:
            os.set_inheritable(fd, False)  # not every Python passes MSG_CMSG_CLOEXEC on
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise OSError(msg.decode(errors="replace") or "the namespace helper ended without a word")
        return fds[0], fds[1]


def huge_page_file(size: int, namespace: bool = True) -> tuple[int | None, int | None, str]:
    """(file fd, mount fd, how) of a file for ``size`` bytes of RAM on huge
    pages, or (None, None, why not).  ``how`` names the route taken.
    ``namespace``: without privilege, take the user-namespace route (whose
    mount this process cannot switch to small pages later)."""
    if _libc is None or not os.path.exists("/sys/kernel/mm/transparent_hugepage"):
        return None, None, "this kernel has no transparent huge pages"
    if shmem_thp_mode() == "deny":
        return None, None, "the host denies huge pages to tmpfs (shmem_enabled is deny)"
    try:
        return (*_mount_and_open(size), "private tmpfs")
    except OSError as first:
        if first.errno not in (1, 13):  # EPERM, EACCES: try without privilege; else the kernel lacks it
            return None, None, f"no private tmpfs: {first.strerror or first}"
        if not namespace:
            return None, None, "mounting a private tmpfs needs CAP_SYS_ADMIN (see --huge-pages on)"
    try:
        return (*_open_in_namespace(size), "private tmpfs in a user namespace")
    except OSError as exc:
        return None, None, f"no private tmpfs without privilege: {exc.strerror or exc}"


def small_pages(mount: int) -> None:
    """From now on the mount's files take 4 KiB pages (pages already there
    stay as they are).  Needs CAP_SYS_ADMIN in this process's own mount
    namespace: the privileged route only.  Raises OSError."""
    picked = _check(_syscall(_SYS_FSPICK, mount, b"", _FSPICK_CLOEXEC | _FSPICK_EMPTY_PATH), "fspick")
    try:
        _check(_syscall(_SYS_FSCONFIG, picked, _FSCONFIG_SET_STRING, b"huge", b"never", 0), "fsconfig(huge)")
        _check(_syscall(_SYS_FSCONFIG, picked, _FSCONFIG_CMD_RECONFIGURE, None, None, 0), "fsconfig(reconfigure)")
    finally:
        os.close(picked)


def shmem_thp_mode(path: str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled") -> str | None:
    """The host's bracketed shmem THP mode (never, within_size, ... deny), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None
