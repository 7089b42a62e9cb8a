"""Mapping the files the frontend processes share: created and sized once, seen by every
mapping at once, and a file of another size refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from frontend.shared_memory import map_shared_file


def test_two_mappings_of_a_new_file_share_its_bytes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared")
    first_fd, first = map_shared_file(path, 16)
    second_fd, second = map_shared_file(path, 16)
    try:
        assert os.path.getsize(path) == 16 and second[:16] == bytes(16)  # zero-filled
        first[3] = 7
        assert second[3] == 7  # one file, not a copy
    finally:
        for fd, mapped in ((first_fd, first), (second_fd, second)):
            mapped.close()
            os.close(fd)


def test_a_file_of_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    path.write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="10 bytes, not the 16 expected"):
        map_shared_file(str(path), 16)
    assert path.read_bytes() == b"x" * 10  # left as it was
