"""A rank of the 2-process gloo group in test_distributed's all_finite test (its own module so
that the spawned processes import only this, not the test module's transformers)."""

from pathlib import Path

import torch


def all_finite_on_rank(rank: int, world: int, address: str, out: str) -> None:
    """One rank of a gloo group: rank 1's adapter weight is NaN, rank 0's finite."""
    from peftune.checkpoints import all_finite

    torch.distributed.init_process_group("gloo", init_method=address, rank=rank,
                                         world_size=world)
    model = torch.nn.Linear(2, 2)
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    Path(out, f"rank{rank}").write_text(str(all_finite(model)))
    torch.distributed.destroy_process_group()

