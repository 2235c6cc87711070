"""What the jail's child does to itself before it touches a foreign model.

Order matters: limits first, then (where privileges allow) a network namespace, an empty root
and an unprivileged uid, and last a seccomp filter that no later code can lift. The seccomp
filter is the layer that holds everywhere, root or not, in Docker or not: without it the child
refuses to run the model. The other layers are added where the process may take them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyseccomp as sc

if TYPE_CHECKING:
    from core.settings import Settings

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x40000000, 0x00010000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

# Refused with EPERM once the filter is on. Reading, writing or listing any file by name;
# changing the filesystem; sockets; new programs or processes (threads stay allowed); looking
# into or signalling other processes; kernel interfaces that bypass seccomp or widen the
# attack surface (io_uring, bpf, perf, userfaultfd, keyrings, namespaces, modules).
DENIED_SYSCALLS = (
    "open", "openat", "openat2", "creat", "open_by_handle_at", "name_to_handle_at",
    "truncate", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
    "rmdir", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmodat", "fchmodat2", "chown",
    "lchown", "fchownat", "mknod", "mknodat", "utime", "utimes", "utimensat", "futimesat",
    "setxattr", "lsetxattr", "removexattr", "lremovexattr", "readlink", "readlinkat",
    "inotify_add_watch", "fanotify_init", "fanotify_mark", "chdir", "chroot", "pivot_root",
    "mount", "umount2", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsmount",
    "fspick", "swapon", "swapoff", "acct", "quotactl",
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "kcmp", "setns", "unshare",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "syslog", "personality",
)


@dataclass(frozen=True)
class Limits:
    """What one jailed child may use. `memory_bytes` is address space on top of what the
    interpreter, torch and onnxruntime already map when the limit is set."""

    memory_bytes: int = 4 << 30
    cpu_seconds: int = 600
    threads: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The operator's GS_JAIL_* limits (core/settings.py)."""
        return cls(memory_bytes=settings.jail_memory_bytes, cpu_seconds=settings.jail_cpu_seconds,
                   threads=settings.jail_threads)


class LockdownError(RuntimeError):
    pass


def die_with_parent(parent_pid: int) -> None:
    """The child must not outlive whoever asked for it."""
    _prctl(PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent_pid:
        os._exit(1)


def apply(limits: Limits, root: str) -> list[str]:
    """Lock this process down; returns the layers that took. `root` is an empty folder that
    becomes `/` where chroot is allowed."""
    layers = ["rlimits"]
    _set_limits(limits)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/PID peeking by processes of the same uid
    if os.geteuid() == 0:
        layers += _as_root(root)
    else:
        layers += _in_user_namespace(root)
    _seccomp()
    layers.append("seccomp")
    return layers


def _set_limits(limits: Limits) -> None:
    mapped = address_space_in_use()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + limits.memory_bytes,) * 2)
    # Soft limit: SIGXCPU, which ends the process; the hard limit a little later is SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file grows, whatever is open
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def address_space_in_use() -> int:
    """This process's virtual size (VmSize), in bytes: what RLIMIT_AS counts."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise LockdownError("no VmSize in /proc/self/status")


def _as_root(root: str) -> list[str]:
    layers = []
    try:
        _unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        layers.append("network_namespace")
    except OSError:
        pass  # a container without CAP_SYS_ADMIN: seccomp still refuses sockets
    os.chroot(root)
    os.chdir("/")
    layers.append("chroot")
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    layers.append("uid_nobody")
    return layers


def _in_user_namespace(root: str) -> list[str]:
    """Unprivileged: a user namespace gives a network namespace and chroot, where the kernel
    (or the container's seccomp profile) allows one."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    except OSError:
        return []
    with open("/proc/self/setgroups", "w") as handle:
        handle.write("deny")
    with open("/proc/self/uid_map", "w") as handle:
        handle.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as handle:
        handle.write(f"0 {gid} 1")
    os.chroot(root)
    os.chdir("/")
    return ["user_namespace", "network_namespace", "chroot"]


def _seccomp() -> None:
    try:
        seccomp_filter = sc.SyscallFilter(defaction=sc.ALLOW)
        for name in DENIED_SYSCALLS:
            try:
                seccomp_filter.add_rule(sc.ERRNO(errno.EPERM), name)
            except (OSError, ValueError, RuntimeError):
                pass  # not a syscall on this architecture
        # Threads only: clone without CLONE_THREAD would be a new process. clone3 passes its
        # flags in memory, out of the filter's sight: ENOSYS makes the C library use clone.
        seccomp_filter.add_rule(
            sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0)
        )
        seccomp_filter.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        own = os.getpid()
        for name in ("kill", "tgkill"):  # signals to this process only
            seccomp_filter.add_rule(sc.ERRNO(errno.EPERM), name, sc.Arg(0, sc.NE, own))
        seccomp_filter.load()  # sets no_new_privs too
    except Exception as exc:
        raise LockdownError(f"seccomp unavailable: {exc}") from None


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)
