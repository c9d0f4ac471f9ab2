"""A real Redis Cluster on loopback for the tests: 3 masters + 3 replicas, each a redis-server process
of its own on a free port (cluster-enabled, a 1 s node timeout so a failover takes a few seconds),
created with `redis-cli --cluster create --cluster-replicas 1`. Never the Redis on 6379.

    with LocalCluster(tmp_path) as cluster:      # skips the test when redis-server / redis-cli are missing
        url = cluster.url                        # redis://127.0.0.1:PORT/0 (any node will do)
        cluster.kill_master_of("din:hist:u1")    # SIGKILL; cluster.wait_promoted(...) for its replica

The `redis_cluster` fixture (session) is one healthy cluster shared by the tests that do not break it;
`cluster_url` empties it (FLUSHALL on every master) before each test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from service.store.embedded import _die_with_parent, free_port

NODE_TIMEOUT_MS = 1000


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as c:
            return {k: str(v) for k, v in c.info(section).items()}

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1) -> None:
        self.workdir = workdir
        self.masters, self.replicas = masters, replicas
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def __enter__(self) -> LocalCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.skip("redis-server and redis-cli are needed for a Redis Cluster (apt-get install redis)")
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self.nodes.append(self._start(server))
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            create = [cli, "--cluster", "create", *addresses]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            out = subprocess.run(create, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, server: str) -> Node:
        port = free_port()
        d = self.workdir / f"node-{port}"
        d.mkdir(parents=True)
        cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d)]
        # the cluster bus on a free port of its own (by default it is port + 10000)
        cmd += [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            str(free_port()),
        ]
        cmd += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "no", "--save", ""]
        cmd += ["--logfile", "redis.log"]
        # dies with the test process, even a killed one (PR_SET_PDEATHSIG, as EmbeddedRedis does)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        node = Node(port, proc, d / "redis.log")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError), node.client() as c:
                if c.ping():
                    return node
            assert node.alive and time.monotonic() < deadline, f"redis-server on {port} did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=5)

    # ------------------------------------------------------------------ state

    def roles(self) -> dict[int, str]:
        """port -> 'master' / 'slave' of every live node, as each node says of itself."""
        return {n.port: n.info("replication")["role"] for n in self.nodes if n.alive}

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node sees the cluster ok, and every live replica's link to its master is up."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok = all(n.info("cluster")["cluster_enabled"] == "1" for n in self.nodes if n.alive)
                for n in self.nodes:
                    if not n.alive:
                        continue
                    with n.client() as c:
                        ok = ok and c.execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                        # and its slot map already names every shard's replicas (gossip takes a moment)
                        slots = c.execute_command("CLUSTER SLOTS")
                        ok = ok and all(len(entry) >= 3 + self.replicas for entry in slots)
                    rep = n.info("replication")
                    ok = ok and (rep["role"] == "master" or rep.get("master_link_status") == "up")
                if ok:
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, f"cluster not healthy after {timeout}s: {self.roles()}"
            time.sleep(0.1)

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url, decode_responses=True, socket_timeout=5)

    def flush(self) -> None:
        with self.client() as c:
            c.flushall(target_nodes=RedisCluster.PRIMARIES)

    def wait_replicated(self) -> None:
        """Every write so far has reached the replicas (WAIT on every master)."""
        with self.client() as c:
            for node in c.get_primaries():
                acks = c.execute_command("WAIT", self.replicas, 5000, target_nodes=node)
                assert int(acks) >= self.replicas, (node, acks)

    def master_of(self, key: str) -> Node:
        """The live node that serves `key`'s slot, as a live node's CLUSTER SLOTS says."""
        slot = key_slot(key.encode())
        with next(n for n in self.nodes if n.alive).client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError(f"no node serves slot {slot}")

    def replica_of(self, master: Node) -> Node:
        for n in self.nodes:
            if n is master or not n.alive:
                continue
            rep = n.info("replication")
            if rep["role"] == "slave" and int(rep["master_port"]) == master.port:
                return n
        raise AssertionError(f"no replica of {master.port}")

    def kill(self, node: Node) -> None:
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=5)

    def wait_promoted(self, node: Node, timeout: float = 30) -> float:
        """Wait until `node` (a replica) is a master; returns time.monotonic() when it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError):
                if node.info("replication")["role"] == "master":
                    return time.monotonic()
            assert time.monotonic() < deadline, f"replica {node.port} not promoted after {timeout}s"
            time.sleep(0.05)


_shared: LocalCluster | None = None


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    """One healthy 3 + 3 cluster for the session (tests that kill nodes start their own).

    The modules import this fixture, and pytest makes a fixture imported into a module that module's
    own (a session fixture per module: a cluster each, ~10 s apiece). So the cluster is made once per
    process here and stopped when the session ends; each test's `cluster_url` checks it is still whole."""
    global _shared
    if _shared is None:
        cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).__enter__()
        request.config.add_cleanup(cluster.stop)
        _shared = cluster
    return _shared


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The session cluster, emptied before the test: the URL of one of its nodes."""
    assert all(n.alive for n in redis_cluster.nodes), "a test killed a node of the shared cluster"
    redis_cluster.wait_healthy()
    redis_cluster.flush()
    return redis_cluster.url
