"""A throwaway Redis Cluster for tests: 6 redis-server processes (3 masters, 3 replicas)
on free ports in a temp dir, created with ``redis-cli --cluster create``.

It can kill a master (its replica takes over after ``cluster-node-timeout``) and
move a slot from one master to another (CLUSTER SETSLOT IMPORTING / MIGRATING,
MIGRATE of the slot's keys, SETSLOT NODE on every master), as an operator's
``redis-cli --cluster reshard`` would.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot

NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 30000)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


class RedisClusterServers:
    """Six redis-server processes forming one cluster with one replica per master."""

    def __init__(self, workdir: Path, *, masters: int = 3, replicas: int = 1) -> None:
        self.workdir = workdir
        self.count = masters * (1 + replicas)
        self.replicas = replicas
        self.ports = cluster_ports(self.count)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        assert binary and cli, "redis-server / redis-cli are not installed"
        self.binary, self.cli = binary, cli

    @property
    def url(self) -> str:
        """The broker URL: every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=5)

    def _spawn(self, port: int) -> None:
        node_dir = self.workdir / f"node-{port}"
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(node_dir),
                "--logfile",
                str(node_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> RedisClusterServers:
        """Spawn, create the cluster, wait until it is ok; on any failure, stop them all."""
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait_ping(port)
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()

    def _wait_ping(self, port: int) -> None:
        client = self.client(port)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and agrees on 3 masters with slots,
        and every replica has synced (one that never did cannot take over)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._node_ok(p) for p in self.live_ports()):
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the cluster did not become ok"
            time.sleep(0.1)

    def _node_ok(self, port: int) -> bool:
        client = self.client(port)
        try:
            info = client.execute_command("CLUSTER INFO")  # parsed into a dict
            if info.get("cluster_state") != "ok" or len(self.masters(port)) != self.count // (
                1 + self.replicas
            ):
                return False
            repl = client.info("replication")
            return repl["role"] == "master" or repl.get("master_link_status") == "up"
        finally:
            client.close()

    def masters(self, via: int | None = None) -> dict[int, list[tuple[int, int]]]:
        """port -> slot ranges of every master, as node ``via`` sees it."""
        client = self.client(via or self.live_ports()[0])
        try:
            raw = client.execute_command("CLUSTER SLOTS")
        finally:
            client.close()
        out: dict[int, list[tuple[int, int]]] = {}
        if isinstance(raw, dict):  # redis-py parses it into {(start, end): {...}}
            for (start, end), info in raw.items():
                out.setdefault(int(info["primary"][1]), []).append((start, end))
            return out
        for entry in raw:
            out.setdefault(int(entry[2][1]), []).append((int(entry[0]), int(entry[1])))
        return out

    def owner(self, key: str, via: int | None = None) -> int:
        """The port of the master that owns ``key``'s slot."""
        slot = key_slot(key.encode())
        for port, ranges in self.masters(via).items():
            if any(a <= slot <= b for a, b in ranges):
                return port
        raise AssertionError(f"slot {slot} is not covered")

    def node_id(self, port: int) -> str:
        client = self.client(port)
        try:
            return str(client.execute_command("CLUSTER MYID").decode())
        finally:
            client.close()

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def pause(self, port: int) -> None:
        """Freeze a node (SIGSTOP): its connections stay open, nothing answers."""
        self.procs[port].send_signal(signal.SIGSTOP)

    def move_slot(self, slot: int, source: int, target: int) -> None:
        """Migrate ``slot`` with its keys from master ``source`` to master ``target``."""
        src, dst = self.client(source), self.client(target)
        try:
            src_id, dst_id = self.node_id(source), self.node_id(target)
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            for port in self.masters():
                if port not in (source, target):
                    other = self.client(port)
                    try:
                        other.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                    finally:
                        other.close()
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)
