"""A real launch, as a user runs it: ``Trainer(strategy="zo2_offload", devices=N, num_nodes=M)`` in a script.

    python -m tests.dist_script OUT_DIR --devices 2                    # Lightning's popen launcher starts rank 1
    NODE_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python -m tests.dist_script OUT_DIR --devices 1 --num-nodes 2  # one process per "node", started by hand
    torchrun --nproc-per-node 2 -m tests.dist_script OUT_DIR --devices 2

Each rank writes OUT_DIR/rank{r}.pt (see tests.dist_helpers.RankRecorder). The model is float64 so that the
test can hold the result to 1 rank with the double batch at a tight tolerance. Used by tests/test_distributed.py.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L

import zo2_lightning  # noqa: F401  (registers "zo2_offload")
from tests import dist_helpers as dh
from tests.lit_helpers import SEED

STEPS, PER_RANK_BATCH, EXAMPLES = 3, 2, 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    args = parser.parse_args()
    L.seed_everything(SEED, verbose=False)  # the strategy's seed=None takes this one
    task = dh.task()
    trainer = L.Trainer(strategy="zo2_offload", devices=args.devices, num_nodes=args.num_nodes, max_steps=STEPS,
                        precision="64-true", callbacks=[dh.RankRecorder(args.out_dir)], **dh.QUIET)
    trainer.fit(task, dh.loader(dh.examples(EXAMPLES), PER_RANK_BATCH))


if __name__ == "__main__":
    main()
