"""The local stack's non-root deploy user: a real Unix user, sudo rules for exactly the commands
that need root, and the hosts' deploy roots owned by it.

``ensure_user`` creates ``kmpdeploy`` once on this machine (``useradd --system``; its password
field is ``*``, so it has no password but is not "locked" for sshd, which refuses locked
accounts when PAM is off); every stack of every checkout on the machine shares it, so no stack
removes it (``remove_user`` does, for ``make clean``-like tear-downs by hand). ``install_sudoers``
writes one file per stack, ``/etc/sudoers.d/kmpops-stack-<hash of the stack root>``, validated
with ``visudo -cf`` before it is renamed into place (mode 0440); ``remove_sudoers`` deletes it.
Nothing here runs unless the stack runs as root (only root can start sshd daemons that log
other users in).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from kmpops.stack._proc import StackError

__all__ = [
    "DEPLOY_USER",
    "SUDOERS_DIR",
    "check_reachable",
    "ensure_user",
    "give_to",
    "install_sudoers",
    "remove_placed_hosts",
    "remove_sudoers",
    "remove_user",
    "sudoers_file",
]

DEPLOY_USER = "kmpdeploy"
SUDOERS_DIR = Path("/etc/sudoers.d")


def ensure_user(name: str = DEPLOY_USER) -> pwd.struct_passwd:
    """The Unix user ``name``, created if missing (system user, shell /bin/bash, home
    /var/lib/<name>, password ``*``). Idempotent and safe against a concurrent creation by
    another stack. Raises StackError with useradd's message if it cannot be created."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    command = [
        "useradd",
        "--system",
        "--create-home",
        "--home-dir",
        f"/var/lib/{name}",
        "--shell",
        "/bin/bash",
        "--password",
        "*",
        "--comment",
        "kmp-ops deploy user (local stack)",
        name,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    try:
        return pwd.getpwnam(name)  # created now, or by another stack in the meantime
    except KeyError:
        raise StackError(
            f"could not create the deploy user {name}: {done.stderr.strip() or done.returncode}"
        ) from None


def remove_user(name: str = DEPLOY_USER) -> bool:
    """Delete the user ``name`` and its home (``userdel -r``); True if it existed. For a
    machine's tear-down by hand: other stacks on the machine may still use it."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30, check=False)
    return True


def check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Raise StackError naming the first directory above ``path`` that ``user`` cannot enter
    (sshd reads a user's authorized_keys as that user, and the deploy user works below the
    host roots). Judged by mode bits, owner and primary group (root sees everything)."""
    path = Path(path).resolve()
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            break
        info = directory.stat()
        if info.st_uid == user.pw_uid:
            ok = bool(info.st_mode & stat.S_IXUSR)
        elif info.st_gid == user.pw_gid:
            ok = bool(info.st_mode & stat.S_IXGRP)
        else:
            ok = bool(info.st_mode & stat.S_IXOTH)
        if not ok:
            raise StackError(
                f"the deploy user {user.pw_name} cannot enter {directory} (mode "
                f"{stat.S_IMODE(info.st_mode):04o}), which holds the stack root {path}: put the "
                "stack somewhere it can reach, or start it without a deploy user "
                "(StackSpec(deploy_user=None))"
            )


def give_to(paths: list[Path], user: pwd.struct_passwd) -> None:
    """``chown -R`` each of ``paths`` (created as directories if missing) to ``user``."""
    for top in paths:
        top.mkdir(parents=True, exist_ok=True)
        for current, dirs, files in os.walk(top):
            os.chown(current, user.pw_uid, user.pw_gid, follow_symlinks=False)
            for name in [*dirs, *files]:
                os.chown(Path(current) / name, user.pw_uid, user.pw_gid, follow_symlinks=False)


def sudoers_file(root: Path) -> Path:
    """The stack's sudoers file: one per stack root (the name has no dot: sudo skips those)."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return SUDOERS_DIR / f"kmpops-stack-{digest}"


def install_sudoers(root: Path, text: str) -> Path:
    """Validate ``text`` with ``visudo -cf`` and install it as :func:`sudoers_file` (0440,
    root-owned, renamed into place). Raises StackError with visudo's words if it is invalid
    (nothing installed) or if sudo is not installed."""
    if shutil.which("visudo") is None:
        raise StackError(
            "sudo is not installed (the stack's deploy user needs it): make system-deps"
        )
    SUDOERS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = sudoers_file(root)
    # A name with a dot is ignored by sudo's @includedir, so the candidate is never live.
    candidate = SUDOERS_DIR / f".{target.name}.new"
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o440)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(candidate, 0o440)
    done = subprocess.run(
        ["visudo", "-cf", str(candidate)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        candidate.unlink(missing_ok=True)
        raise StackError(
            f"visudo refused the stack's sudo rules: {(done.stdout + done.stderr).strip()}"
        )
    os.replace(candidate, target)
    return target


def remove_sudoers(root: Path) -> bool:
    """Delete the stack's sudoers file; True if there was one."""
    target = sudoers_file(root)
    existed = target.exists()
    target.unlink(missing_ok=True)
    return existed


EXTERNAL_HOME = Path("/var/lib/kmpops")


def place_hosts(root: Path, user: pwd.struct_passwd) -> Path:
    """The directory the stack's host roots live in, reachable by the deploy user.

    ``root/hosts`` itself when the deploy user can enter ``root``; otherwise (a checkout under
    root's mode-700 home, say) ``/var/lib/kmpops/hosts-<digest of root>``, with ``root/hosts``
    a symlink to it, so nobody's directory permissions change (PostgreSQL's cluster moves the
    same way). A fresh stack root (no ``hosts`` yet) starts with an empty directory there; a
    stack started again keeps its hosts; a plain ``hosts`` directory of an older stack is moved.
    Raises StackError when even that directory cannot be entered."""
    import hashlib
    import shutil

    root = Path(root).resolve()
    link = root / "hosts"
    if link.is_symlink():
        target = link.resolve()
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        check_reachable(target, user)
        return target
    try:
        check_reachable(root, user)
        return link
    except StackError:
        pass
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    target = EXTERNAL_HOME / f"hosts-{digest}"
    EXTERNAL_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)  # left by a stack root that was removed since: not ours to keep
    if link.is_dir():
        shutil.move(str(link), str(target))
    target.mkdir(mode=0o755, exist_ok=True)
    os.chmod(target, 0o755)  # noqa: S103 - the deploy user must enter it (like /var/lib)
    check_reachable(target, user)
    link.symlink_to(target, target_is_directory=True)
    return target


def remove_placed_hosts(root: Path) -> bool:
    """Delete the host roots :func:`place_hosts` put under /var/lib/kmpops for ``root`` (and
    the ``root/hosts`` symlink); True if there were any. A plain ``root/hosts`` directory is
    left alone (it goes with ``root``). Stop the stack first."""
    import shutil

    link = Path(root).resolve() / "hosts"
    if not link.is_symlink():
        return False
    target = link.resolve()
    link.unlink()
    if target.parent != EXTERNAL_HOME or not target.name.startswith("hosts-"):
        return False  # not one of ours: never delete what the link happens to point at
    shutil.rmtree(target, ignore_errors=True)
    return True
