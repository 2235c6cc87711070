"""The sandbox each jailed child starts in: bubblewrap (`bwrap`, Debian's `bubblewrap`, what Flatpak uses).

bwrap gives the child user, PID, network, mount, IPC, UTS and cgroup namespaces of its own, no capabilities, a
session of its own, and death with its parent. In its mount namespace the child sees only what it needs to start
Python and torch (the system's libraries, the interpreter, its virtual environment, our `jail` and `starvation`
packages) read-only, the one model file it runs, and an empty /tmp. In its PID namespace it can name no process
outside its own sandbox, so no jail can signal, throttle or inspect another, the worker or the API. Where bwrap is
missing or cannot make its namespaces, no foreign model runs (`jail_unavailable`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jail", "starvation")  # all the child imports of ours
INSIDE_ROOT = "/gs"  # where those packages appear in the sandbox (PYTHONPATH)
MODEL_PATH = "/gs-model"  # where the model file appears, read-only
NOBODY = 65534


class SandboxUnavailable(RuntimeError):
    pass


def executable() -> str | None:
    return shutil.which("bwrap")


def _system_paths() -> list[str]:
    """Read-only binds that start the interpreter: libraries, the interpreter's own prefix, its packages."""
    paths = {
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/bin",
        "/sbin",
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/localtime",
        "/sys/devices/system/cpu",
        "/sys/fs/cgroup",
    }
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths.add(str(Path(prefix).resolve()))
        paths.add(prefix)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if (path := sysconfig.get_paths().get(key)) is not None:
            paths.add(str(Path(path).resolve()))
    paths.add(str(Path(sys.executable).resolve().parent))
    return sorted(p for p in paths if not _inside(p, PROJECT_ROOT) or p.startswith(sys.prefix))


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def command(argv: list[str], model_path: str | Path, env: dict[str, str]) -> list[str]:
    """The bwrap command line that runs `argv` in a fresh sandbox with exactly the environment `env`; the
    descriptors Popen passes (pass_fds) are inherited as they are."""
    bwrap = executable()
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    args = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
    ]
    for path in _system_paths():
        args += ["--ro-bind-try", path, path]
    for package in PACKAGES:
        args += ["--ro-bind", str(PROJECT_ROOT / package), f"{INSIDE_ROOT}/{package}"]
    args += ["--ro-bind", str(Path(model_path).resolve()), MODEL_PATH, "--remount-ro", "/"]
    for name, value in env.items():
        args += ["--setenv", name, value]
    return [*args, "--", *argv]


@lru_cache(maxsize=1)
def check() -> None:
    """Raise SandboxUnavailable unless bwrap runs here with every namespace (once per process)."""
    bwrap = executable()
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    try:
        subprocess.run(
            command([sys.executable, "-c", "pass"], __file__, {}), check=True, capture_output=True, timeout=60
        )
    except subprocess.CalledProcessError as exc:
        raise SandboxUnavailable(f"bwrap cannot make its namespaces here: {exc.stderr.decode()[-300:]}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bwrap did not start: {exc}") from None
