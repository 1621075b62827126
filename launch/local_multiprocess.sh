#!/usr/bin/env bash
# Several JAX processes on this machine, talking over 127.0.0.1 with gloo CPU collectives: the
# multi-host code path (jax.distributed, process-local data, process-0 outputs) without a cluster.
#
# usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR [train flags...]
# e.g.   launch/local_multiprocess.sh 2 2 runs/mp --config.train.batch_size=8
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
n=$1; devices=$2; workdir=$3; shift 3
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cmd=${CLIDIM_JAX:-clidim-jax}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu $cmd train --workdir "$workdir" \
    --coordinator_address "127.0.0.1:$port" --num_processes "$n" --process_id "$i" \
    --local_cpu_devices "$devices" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
