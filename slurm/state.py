"""The job's state file (`<job_dir>/state.json`): the one place the running job tells the outside.

The job's supervisor (`slurm.supervise`) writes it as it goes;
`hpcserve status` reads it and combines it with what Slurm says. Writes are atomic (rename),
and FAILED is final: a later FINISHED (the script's exit trap) keeps the failure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

# DRAINING: the job is ending (time limit, preemption, removal): no new requests, held
# ones finish; the gateway sends new ones elsewhere.
State = Literal["PENDING", "STARTING", "READY", "DRAINING", "FAILED", "FINISHED"]
STATES: tuple[str, ...] = get_args(State)
STATE_FILE = "state.json"


@dataclass(frozen=True)
class JobState:
    state: State
    job_id: str | None = None
    url: str | None = None  # the OpenAI base URL once READY
    component: str | None = None  # what failed (FAILED)
    log: str | None = None  # that component's log file
    message: str | None = None
    stage: str | None = None  # STARTING: services | workers | frontend
    restarts: dict[str, int] | None = None  # component -> times the supervisor restarted it
    benchmark: str | None = None  # the benchmark step: running | valid | invalid (exit N)
    reason: str | None = None  # DRAINING/FINISHED: time limit | preempted | cancelled | removed
    successor: str | None = None  # the job dir of the next generation, once submitted
    updated: float = 0.0


def read_state(job_dir: str | Path) -> JobState | None:
    """The last state written, or None before the first write."""
    try:
        data = json.loads((Path(job_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    fields = set(JobState.__dataclass_fields__)
    return JobState(**{key: value for key, value in data.items() if key in fields})


def write_state(job_dir: str | Path, state: State, **fields: Any) -> JobState:
    """Record `state`; keeps fields (job_id, url, restarts) of earlier writes unless given
    again."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
    previous = read_state(job_dir)
    if previous is not None and previous.state == "FAILED" and state in ("FAILED", "FINISHED"):
        return previous  # the first failure is the one worth reporting
    merged = {
        "job_id": previous.job_id if previous else None,
        "url": previous.url if previous else None,
        "restarts": previous.restarts if previous else None,
        "benchmark": previous.benchmark if previous else None,
        "reason": previous.reason if previous else None,
        "successor": previous.successor if previous else None,
    }
    merged.update({key: value for key, value in fields.items() if value is not None})
    new = JobState(state=state, updated=time.time(), **merged)  # type: ignore[arg-type]
    path = Path(job_dir) / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(new), indent=2) + "\n")
    tmp.replace(path)
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.state", description=__doc__)
    parser.add_argument("job_dir")
    parser.add_argument("state", choices=STATES)
    for name in ("job-id", "url", "component", "log", "message", "stage", "reason"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    write_state(
        args.job_dir, args.state, job_id=args.job_id, url=args.url, component=args.component,
        log=args.log, message=args.message, stage=args.stage, reason=args.reason,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
