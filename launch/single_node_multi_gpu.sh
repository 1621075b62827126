#!/usr/bin/env bash
# One process driving every GPU of this machine: the batch is sharded over all local devices
# (jax.make_mesh over jax.devices()), nothing else to set up.
#
# usage: launch/single_node_multi_gpu.sh CONFIG WORKDIR [train flags...]
# e.g.   launch/single_node_multi_gpu.sh configs/reference.py:variant=cl runs/ref --config.model.compute_dtype=bfloat16
# Needs `pip install 'jax[cuda13]'` (or jax[cuda12]). CUDA_VISIBLE_DEVICES picks the GPUs; the
# global batch (config.train.batch_size) must divide by their number.
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
exec clidim-jax train --config "$config" --workdir "$workdir" "$@"
