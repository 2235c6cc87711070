"""What the jail's child does to itself before it touches a foreign model.

The child starts inside bubblewrap (jail/bwrap.py: namespaces of its own, no capabilities, a read-only view of
only what Python needs). Then, after its imports and before it loads the model, it sets its limits and installs
a default-deny seccomp filter: the syscalls that inference, our probes and our repair ops need are allowed
(`ALLOWED_SYSCALLS`), every other one fails with EPERM (clone3 with ENOSYS, so the C library falls back to
clone, whose flags the filter can read). No later code can lift it. Without it the child refuses to run the model.
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

CLONE_THREAD = 0x00010000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME, PR_GET_NAME = 1, 4, 15, 16
PR_SET_VMA = 0x53564D41
AT_EMPTY_PATH = 0x1000

# What a locked-down child may call: memory, threads and their synchronisation, time, reading and writing the
# descriptors it already holds (its two pipes and its output), signals to itself. No file is opened by name, no
# socket made, no process started or named: anything else is EPERM. To add one, see docs/security.md.
ALLOWED_SYSCALLS = (
    # memory
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "mlock",
    "munlock",
    "membarrier",
    "get_mempolicy",
    # threads (clone only with CLONE_THREAD: below) and their synchronisation
    "futex",
    "futex_waitv",
    "set_robust_list",
    "get_robust_list",
    "set_tid_address",
    "rseq",
    "sched_yield",
    "sched_getaffinity",
    "sched_getparam",
    "sched_getscheduler",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "getcpu",
    "arch_prctl",
    "exit",
    "exit_group",
    # signals (kill and tgkill only to itself: below)
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "rt_sigtimedwait",
    "restart_syscall",
    # time
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "time",
    # the descriptors it holds
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "close",
    "fstat",
    "lseek",
    "fcntl",
    "dup",
    "dup3",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "eventfd2",
    "pipe2",
    "ioctl",
    # who and where it is
    "getpid",
    "gettid",
    "getppid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    "getrlimit",
    "getrusage",
    "getrandom",
    "uname",
    "sysinfo",
    "getcwd",
    "getpgrp",
    "getpgid",
    "getsid",
    "times",
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
        return cls(
            memory_bytes=settings.jail_memory_bytes,
            cpu_seconds=settings.jail_cpu_seconds,
            threads=settings.jail_threads,
        )


class LockdownError(RuntimeError):
    pass


def die_with_parent() -> None:
    """The child must not outlive the sandbox that started it (bwrap, which dies with the service)."""
    _prctl(PR_SET_PDEATHSIG, 9)


def apply(limits: Limits) -> list[str]:
    """Lock this process down; returns the layers that took (bubblewrap's, reported by the service, come first)."""
    _set_limits(limits)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/PID peeking, even from inside the sandbox
    _seccomp()
    return ["rlimits", "seccomp"]


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


def _seccomp() -> None:
    try:
        seccomp_filter = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
        for name in ALLOWED_SYSCALLS:
            try:
                seccomp_filter.add_rule(sc.ALLOW, name)
            except (OSError, ValueError, RuntimeError):
                pass  # not a syscall on this architecture
        # Threads only: clone without CLONE_THREAD would be a new process. clone3 passes its flags in memory,
        # out of the filter's sight: ENOSYS makes the C library use clone.
        seccomp_filter.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        seccomp_filter.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        own = os.getpid()
        seccomp_filter.add_rule(sc.ALLOW, "kill", sc.Arg(0, sc.EQ, own))  # signals to this process only
        seccomp_filter.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, own))
        # prlimit64 on itself only, to read its limits (pid 0); prctl only to name threads
        seccomp_filter.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
        # stat only of a descriptor it holds (glibc's fstat is fstatat(fd, "", AT_EMPTY_PATH)), never by name
        seccomp_filter.add_rule(sc.ALLOW, "newfstatat", sc.Arg(3, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
        seccomp_filter.add_rule(sc.ALLOW, "statx", sc.Arg(2, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
        for option in (PR_SET_NAME, PR_GET_NAME, PR_SET_VMA):
            seccomp_filter.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, option))
        seccomp_filter.load()  # sets no_new_privs too
    except Exception as exc:
        raise LockdownError(f"seccomp unavailable: {exc}") from None


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)
