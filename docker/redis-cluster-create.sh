#!/bin/sh
# Compose's `cluster` profile: make one Redis Cluster (3 masters + 3 replicas) of the redis-node-*
# services, once. `redis-cli --cluster create` wants addresses, so each name is resolved first; the
# nodes announce their names (cluster-announce-hostname), so clients are sent to names, not to IPs
# that change when a container is recreated. A cluster that already exists is left as it is.
set -eu
nodes="redis-node-1 redis-node-2 redis-node-3 redis-node-4 redis-node-5 redis-node-6"
if redis-cli -h redis-node-1 cluster info | grep -q '^cluster_state:ok'; then
    echo "cluster already created"; exit 0
fi
addresses=""
for n in $nodes; do
    addresses="$addresses $(getent hosts "$n" | cut -d' ' -f1):6379"
done
# shellcheck disable=SC2086
redis-cli --cluster create $addresses --cluster-replicas 1 --cluster-yes
until redis-cli -h redis-node-1 cluster info | grep -q '^cluster_state:ok'; do sleep 1; done
