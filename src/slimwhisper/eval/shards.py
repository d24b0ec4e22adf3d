"""Which part of a dataset this process evaluates when `eval` runs under several processes.

`accelerate launch --multi_gpu ...` and `torchrun --nproc_per_node N ...` start N copies of the command with
RANK/WORLD_SIZE set. Each copy decodes the planned utterances `rank::world` (a fixed split of the plan, so a
resumed run hands every utterance to the same kind of slot whatever finished before) and logs them to its own
file; the main process then waits for the others and merges everything into the one log and summary a
single process would have written.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from ..errors import SlimWhisperError

T = TypeVar("T")
# Launchers name the process count differently (torchrun, MPI flavours); accelerate reads the same list.
WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# A fast rank waits at the merge for the slowest; a long CPU evaluation must not hit the default timeout.
WAIT_LIMIT = timedelta(hours=48)


def launched_world() -> int:
    """How many processes the launcher started (1 when the command was run directly)."""
    for name in WORLD_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise SlimWhisperError(f"{name}={value!r} is not a number; unset it or launch with torchrun") from None
    return 1


@dataclass(frozen=True)
class Shard:
    """This process's rank among `world` processes; the single-process case is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    state: Any = field(default=None, compare=False, repr=False)  # accelerate's PartialState when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's share: every world-th item from its rank on."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        """Wait until every process got here (nothing to wait for alone)."""
        if self.world > 1:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every process, in rank order (also a barrier)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def current_shard(device: str) -> Shard:
    """The shard of this process: joins the launcher's process group (gloo for `device` cpu, else the GPU
    backend) when several processes were started, else the whole dataset."""
    world = launched_world()
    if world == 1:
        return Shard()
    from accelerate import PartialState

    # cpu=True lets accelerate use gloo; without it a CPU-only machine is told it runs one process
    state = PartialState(cpu=device == "cpu", timeout=WAIT_LIMIT)
    if state.num_processes != world:
        raise SlimWhisperError(
            f"the launcher started {world} processes but they could not be joined (accelerate sees "
            f"{state.num_processes}); launch with `torchrun --nproc_per_node {world}` or "
            f"`accelerate launch --multi_gpu --num_processes {world}`"
        )
    return Shard(state.process_index, state.num_processes, state)


def shard_device(device: str, shard: Shard) -> str:
    """A bare 'cuda' means this process's own GPU when several processes share a node."""
    if shard.world > 1 and device == "cuda":
        return str(shard.state.device)
    return device
