"""Files the frontend processes of one deployment map together (in /dev/shm, named by
`contract.plan`): the round-robin counter (`frontend.rotation`) and the load table
(`frontend.load_table`). One way to open them, so that two processes starting at the same
instant size a new file once and a file of another size (another version's) is refused."""

from __future__ import annotations

import fcntl
import mmap
import os


def map_shared_file(path: str, size: int) -> tuple[int, mmap.mmap]:
    """The open descriptor of the file at `path` (created if missing) and a map of its `size`
    bytes; a new file is sized under an exclusive `flock`, zero-filled. OSError when it exists
    with another size. The caller closes both (the descriptor also carries the file's lock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.fstat(fd).st_size
            if current == 0:
                os.ftruncate(fd, size)
            elif current != size:
                raise OSError(f"{path}: {current} bytes, not the {size} expected")
            return fd, mmap.mmap(fd, size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    except BaseException:
        os.close(fd)
        raise
