"""`TorchEngine.run_group_command`: how a TP leader runs a command (disaggregation: KV to or
from its ranks' head shards) between two steps; a failing follower is fatal to the group,
like a failing step, and nothing waits forever on the dead stepping thread."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from mpi_workers.engine.torch.engine import TorchEngine
from mpi_workers.engine.torch.layers import TpGroup
from mpi_workers.kv_transfer.shards import KvGather, KvScatter


class FakeTp:
    """A TP runtime of one rank whose step-plan channel can be made to fail (a dead
    follower surfaces as an error in the leader's broadcast)."""

    def __init__(self) -> None:
        self.rank, self.size = 0, 1
        self.device = torch.device("cpu")
        self.group = TpGroup(0, 1)
        self.sent: list[Any] = []
        self.fail_with: Exception | None = None

    def broadcast_object(self, obj: Any = None) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(obj)
        return obj

    def close(self) -> None:
        pass


async def test_group_command_runs_between_steps_and_a_failure_is_fatal(
    tiny_llama_dir: Path,
) -> None:
    tp = FakeTp()
    engine = TorchEngine(tiny_llama_dir, num_blocks=16, block_size=4, tp=tp)  # type: ignore[arg-type]
    reasons: list[str] = []
    engine.set_fatal_handler(reasons.append)
    await engine.start()
    try:
        command = KvScatter([1, 2])
        result = await engine.call_in_engine_thread(
            lambda: engine.run_group_command(command, lambda: "lead ran")
        )
        assert result == "lead ran" and tp.sent[-1] is command

        tp.fail_with = RuntimeError("Connection closed by peer")
        with pytest.raises(RuntimeError, match="group failed: RuntimeError: Connection closed"):
            await asyncio.wait_for(
                engine.call_in_engine_thread(
                    lambda: engine.run_group_command(KvGather([3]), lambda: None)
                ),
                10,
            )
        assert engine.failed is not None and "Connection closed" in engine.failed
        assert reasons == [engine.failed]
        with pytest.raises(RuntimeError, match="engine failed"):  # no wait on a dead thread
            await asyncio.wait_for(engine.call_in_engine_thread(lambda: None), 10)
    finally:
        await engine.shutdown()
