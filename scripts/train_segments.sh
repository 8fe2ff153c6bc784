#!/usr/bin/env bash
# Train a draft in segments of SEGMENT seconds: each segment resumes from the orbax work dir
# (weights and optimizer state) and reloads the data, so a draft trains on shards that
# `hsd-jax make-data` is still writing. Stops when the run finishes or fails for another reason.
#   SEGMENT=1200 scripts/train_segments.sh hsd-jax distill --work-dir W ... (the full distill command)
set -u
SEGMENT=${SEGMENT:-1200}
while true; do
  timeout --signal=INT "$SEGMENT" "$@"
  status=$?
  [ "$status" -eq 124 ] || [ "$status" -eq 130 ] || exit "$status"
  echo "segment ended; resuming with the data present now" >&2
done
