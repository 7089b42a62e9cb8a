"""Print hpcserve's requirements (dependencies + the `services` extra) that the TensorRT-LLM
image may take, one a line: torch, mpi4py and pip MPICH are left to the image (its own torch,
and mpi4py built against its Open MPI, whose `mpirun` pip MPICH would shadow)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

KEEP_OUT = {"torch", "mpi4py", "mpich"}


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["services"]
    return [
        r for r in wanted if re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() not in KEEP_OUT
    ]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]))))
