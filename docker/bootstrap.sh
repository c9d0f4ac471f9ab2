#!/bin/sh
# Compose's one-shot bootstrap (the `train` image): build a bundle into /models and seed Redis.
# Idempotent: `din demo --no-serve` skips every stage whose output is already in the volume
# (raw data, prepared data, run, bundle) and skips seeding when Redis already holds the histories.
# Sizes: DIN_SYNTH_USERS, DIN_SYNTH_ITEMS, DIN_EPOCHS. Redis: DIN_REDIS_URL (required), a node of a
# Redis Cluster when DIN_REDIS_CLUSTER=true.
set -eu

: "${DIN_REDIS_URL:?DIN_REDIS_URL must point at the Redis to seed}"
workdir="${DIN_MODELS:-/models}"

cluster=""
[ "${DIN_REDIS_CLUSTER:-false}" = "true" ] && cluster="--redis-cluster"
# shellcheck disable=SC2086
exec din demo --no-serve $cluster \
    --workdir "$workdir" \
    --redis-url "$DIN_REDIS_URL" \
    --users "${DIN_SYNTH_USERS:-4000}" \
    --items "${DIN_SYNTH_ITEMS:-3000}" \
    --epochs "${DIN_EPOCHS:-2}"
