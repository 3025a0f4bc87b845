"""Run under torchrun by test_large_table.py: train, then record which shards this rank holds.

    torchrun --standalone --nproc-per-node 2 tests/large_table_worker.py CONFIG DATA OUT

Each rank writes ``OUT/shards-rank<r>.json`` with the global shape of every embedding
weight and the offsets and sizes of the shards that it holds in memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.distributed._shard.sharded_tensor import ShardedTensor

from trainer.train import Trainer
from valuerank.config import load_config


def main() -> None:
    config, data, out = sys.argv[1:4]
    trainer = Trainer(load_config(config), Path(data), Path(out))
    trainer.train()

    tables = {}
    for key, value in trainer.model.state_dict().items():
        if not isinstance(value, ShardedTensor):
            continue
        tables[key] = {
            "shape": list(value.size()),
            "local_shards": [
                {"offsets": shard.metadata.shard_offsets, "sizes": shard.metadata.shard_sizes, "numel": shard.tensor.numel()}
                for shard in value.local_shards()
            ],
        }
    path = Path(out) / f"shards-rank{trainer.rank}.json"
    path.write_text(json.dumps({"tables": tables, "plan": trainer.plan}))
    trainer.cleanup()


if __name__ == "__main__":
    main()
