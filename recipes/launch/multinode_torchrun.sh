#!/usr/bin/env bash
# Two (or more) nodes with torchrun: run this script once on every node, each with its own NODE_RANK.
# One rendezvous at the head node's address; every node starts NPROC_PER_NODE processes (one per GPU).
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 recipes/launch/multinode_torchrun.sh RECIPE.yaml
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 recipes/launch/multinode_torchrun.sh RECIPE.yaml
# Extra arguments go to `prefixvqa train` (e.g. --set train.distributed=fsdp). train.batch_size is per process: the
# global batch is batch_size x grad_accum x NNODES x NPROC_PER_NODE. Only global rank 0 writes the output folder,
# which must be on storage every node sees if you want to resume from it.
# Tested on one machine (tests/test_multinode.py): NNODES=2 NPROC_PER_NODE=1 MASTER_ADDR=127.0.0.1 on CPU (gloo).
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK (0 on the head node, 1.. on the others)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the head node}"
exec torchrun --nnodes "${NNODES:-2}" --nproc_per_node "${NPROC_PER_NODE:-8}" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    -m prefixvqa.cli train "$@"
