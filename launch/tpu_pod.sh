#!/usr/bin/env bash
# A TPU-VM pod slice: the same command on every worker; jax.distributed.initialize()
# auto-detects the pod, and each host drives its local TPU chips.
#
# usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [train flags...]
# e.g.   launch/tpu_pod.sh my-v5e-32 us-west4-a configs/reference.py gs://bucket/runs/ref
# WORKDIR must be shared by all workers (a gs:// path or a shared filesystem): Orbax writes the
# checkpoints cooperatively and process 0 writes the logs and figures.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
repo=${CLIDIM_JAX_REPO:-git+https://github.com/clidim-jax/clidim-jax}
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  pip install -q 'jax[tpu]' '$repo'
  clidim-jax train --config '$config' --workdir '$workdir'$extra
"
