"""Writing files safely: the permissions a plainly written file would get, and a writability check before work.

    plain_file_mode()                 -> 0o666 & ~umask, what open(path, "w") gives a new file
    check_writable(folder, what)      -> OSError-free return, or a ValueError naming the folder and the reason

Atomic writers create a temporary file (tempfile.mkstemp makes it 0600, private) and rename it into place; they
chmod it to `plain_file_mode()` first, so the result has the permissions the user's umask asks for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    return 0o666 & ~current_umask()


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create and remove a probe file in `folder`: the real test (permissions, a read-only or full filesystem,
    ACLs), done before the work so that a long run does not fail at its first write."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what}: folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ldm-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write in folder {str(folder)!r} ({e.strerror or e})") from None
