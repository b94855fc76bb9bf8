"""The data settings (`data:`)."""
from __future__ import annotations

from typing import Optional

from pafm.config import Relation, at_least, section, setting, within, words


@section("data")
class DataConfig:
    # a dataset folder written by `pafm.prep`, or builtin:digits / builtin:digits-captions
    spec: str = setting("builtin:digits", words("a dataset folder or builtin:NAME"))
    batch_size: int = setting(256, at_least(1))  # global batch per optimizer step (all ranks, all accumulation steps)
    # rows per rank per forward; default batch_size / world size
    micro_batch_size: Optional[int] = setting(None, at_least(1, "null: data.batch_size / world size"))
    flip: bool = True  # pick the stored horizontally flipped copy with probability 1/2
    num_workers: int = setting(2, within(0, 256, "loader processes per rank; 0 loads in the trainer"))
    validate: bool = True  # check the shards (checksums, NaN/Inf) before the first step; a shard that passed
    #                        before and is unchanged since is not read again

    RELATIONS = (Relation("micro_batch_size", lambda d: d.micro_batch_size is None
                          or d.batch_size % d.micro_batch_size == 0, "a divisor of data.batch_size={batch_size}"),)
