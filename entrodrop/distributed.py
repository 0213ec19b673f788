"""Data-parallel runs under ``accelerate launch``: which process measures which windows, and the exact
reduction of what they measured. The one place that knows about several processes.

``accelerate launch --multi_gpu --num_processes 2 -m entrodrop scan ...`` starts one process per device
(torchrun underneath; on a machine without GPUs the processes are CPU ones and talk over gloo, as
``torchrun --nproc-per-node 2 -m entrodrop scan ...`` does too). Each process:

* takes a contiguous share of the windows (:func:`shard`), whole batches for calibration;
* measures it with the same code as a single process;
* hands its *sums and counts* to :func:`sum_across` (never means: a mean of per-process means is exact
  only when every process saw the same number of tokens), its largest values to :func:`max_across`,
  and per-window lists to :func:`concat_across`, which joins them in window order, so a per-window loss
  is the same number at the same index as in a single process.

Only the main process writes files and prints (:func:`is_main`). One process with no launcher is a world
of size 1, and every function here is then the identity, without importing accelerate.

Composes with ``device_map``: a model too big for one device is placed across several devices *inside*
each process (``--device-map auto`` with ``CUDA_VISIBLE_DEVICES`` giving each process its own set), and
the processes split the windows between those replicas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched() -> bool:
    """Started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    """accelerate's view of this process; joins the process group (gloo on CPUs, nccl on GPUs) on first use."""
    from accelerate import PartialState

    # without a GPU, accelerate joins a launched group only when told the processes are CPU ones
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def world() -> World:
    """The processes of this run: ``World(0, 1)`` unless launched with several (then the process group is
    joined here, through accelerate, the first time it is asked)."""
    if not _launched():
        return World()
    state = _state()
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"Launched as {os.environ['WORLD_SIZE']} processes, but accelerate joined "
                           f"{state.num_processes}; launch with `accelerate launch --multi_gpu --num_processes N` "
                           "(torchrun underneath, on CPUs too) or `torchrun --nproc-per-node N -m entrodrop`.")
    return World(state.process_index, state.num_processes)


def process_device() -> torch.device:
    """Where ``device="auto"`` puts this process's model: its own GPU under a multi-GPU launch, else the GPU
    if there is one, else the CPU."""
    if _launched():
        return _state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_main() -> bool:
    """True in the one process that prints and writes files (always, when there is one process)."""
    return world().is_main


def shard(num_items: int, w: World | None = None) -> range:
    """The contiguous share of ``num_items`` (windows or batches) this process measures.

    Shares differ by at most one item and are in rank order, so joining per-item results in rank order
    gives back the single-process order. A process may get none (more processes than items)."""
    w = w or world()
    return range(num_items * w.rank // w.size, num_items * (w.rank + 1) // w.size)


def sum_across(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise sums over the processes of each tensor (the same keys and shapes in every process)."""
    if not _launched():
        return tensors
    from accelerate.utils import reduce

    return reduce(tensors, reduction="sum")


def max_across(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise largest values over the processes."""
    if not _launched():
        return tensors
    from accelerate.utils import reduce

    return reduce(tensors, reduction="max")


def leave() -> None:
    """Wait for every process, then leave the process group (a no-op with one process or none joined).

    Call once at the end of a run that succeeded: a process that exits with gloo's threads still attached
    can abort at interpreter shutdown ("terminate called without an active exception") after its work is
    done. A process that failed exits without it: the others may be inside a collective it will never join,
    and the launcher stops them."""
    if not _launched() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def concat_across(items: list) -> list:
    """Every process's list joined in rank order (each process gets the whole list). Items are pickled."""
    if not _launched():
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))
