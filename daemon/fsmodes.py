"""Private directories without locking others out of shared ones.

The daemon's socket, pid file, state and logs are nobody else's business: their
directories are made 0700. But ``--socket /tmp/x.sock`` (or a state directory in $HOME)
must not chmod /tmp (or $HOME) itself: a directory is only made private when the daemon
created it, or when it is ours, not sticky and holds nothing but the daemon's own files.
Elsewhere the files themselves are 0600 and the directory is left as it is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("ksi.fsmodes")


def private_dir(directory: Path, ours: Callable[[str], bool]) -> bool:
    """Create ``directory`` 0700, or make it 0700 if it is the daemon's own (every entry
    passes ``ours``); returns whether it is private now."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask
        return True
    st = os.stat(directory)
    mine = st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX
    if mine and all(name == ".gitkeep" or ours(name) for name in os.listdir(directory)):
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)
        return True
    log.info(
        "fs.shared_dir",
        path=str(directory),
        mode=oct(stat.S_IMODE(st.st_mode)),
        owner_uid=st.st_uid,
        note="left as it is; the daemon's files in it are 0600",
    )
    return False


def socket_files(sock: Path) -> Callable[[str], bool]:
    """The socket, its pid file and lock: ``<name>`` and ``<stem>.*``."""
    return lambda name: name == sock.name or name.startswith(sock.stem + ".")
