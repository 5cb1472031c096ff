#!/usr/bin/env bash
# textgen's container entrypoint (every image under deploy/docker/ uses this one script).
#
# Configuration is TGI's: launcher flags as arguments, or their environment variables (MODEL_ID,
# REVISION, DTYPE, QUANTIZE, NUM_SHARD, MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS, MAX_BATCH_PREFILL_TOKENS,
# MAX_CONCURRENT_REQUESTS, PORT, ...), read by `textgen serve` itself; `textgen serve --help` lists
# them. The images set PORT=80 and HF_HOME=/data (mount a volume there to keep downloaded weights).
# Without MODEL_ID the bundled demo model is served, offline.
set -euo pipefail

# Docker and Kubernetes set HOSTNAME to the container's name, which textgen would read as the address
# to listen on (TGI's HOSTNAME variable): listen on every interface unless LISTEN_HOSTNAME names one.
export HOSTNAME="${LISTEN_HOSTNAME:-0.0.0.0}"

# Amazon SageMaker's variables, mapped as TGI's SageMaker entrypoint maps them.
if [[ -n "${SM_NUM_GPUS:-}" && -z "${NUM_SHARD:-}" ]]; then
  export NUM_SHARD="${SM_NUM_GPUS}"
fi
if [[ -n "${HF_MODEL_ID:-}" && -z "${MODEL_ID:-}" ]]; then
  export MODEL_ID="${HF_MODEL_ID}"
fi
if [[ -n "${HF_MODEL_REVISION:-}" && -z "${REVISION:-}" ]]; then
  export REVISION="${HF_MODEL_REVISION}"
fi
if [[ -n "${HF_MODEL_QUANTIZE:-}" && -z "${QUANTIZE:-}" ]]; then
  export QUANTIZE="${HF_MODEL_QUANTIZE}"
fi

# exec: textgen becomes the container's main process and receives SIGTERM itself (graceful drain).
exec textgen serve "$@"
