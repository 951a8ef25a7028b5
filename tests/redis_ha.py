"""A replicated Redis for tests: a primary, one replica and three Sentinels, on random free
ports on 127.0.0.1, each a real ``redis-server`` child process (``--sentinel`` for the
Sentinels) that the test may kill. :class:`RedisSet` starts them, tells where the primary is,
kills it and brings it back (as a replica, which the Sentinels make it), and stops everything
by PID at the end.

Sentinel's timings are small so a failover takes a few seconds: the primary counts as down
after ``down_after_ms`` without an answer, and two Sentinels out of three must agree.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from ingest.commands.embedded import EmbeddedRedis, free_port, redis_server_binary

SERVICE = "ingestha"


@dataclass
class RedisSet:
    directory: Path
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    sentinel_count: int = 3
    servers: list[EmbeddedRedis] = field(default_factory=list)
    sentinels: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)

    # -- start and stop ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> RedisSet:
        binary = redis_server_binary()
        primary = EmbeddedRedis(self.directory / "a", appendonly=False, binary=binary).start()
        self.servers.append(primary)
        replica = EmbeddedRedis(self.directory / "b", appendonly=False, binary=binary,
                                extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        self.servers.append(replica.start())
        for i in range(self.sentinel_count):
            port = free_port()
            folder = self.directory / f"sentinel-{i}"
            folder.mkdir(parents=True)
            conf = folder / "sentinel.conf"  # Sentinel rewrites it: its own, writable
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", "daemonize no", f"dir {folder}",
                f"logfile {folder / 'sentinel.log'}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2",
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {SERVICE} 1", ""]))
            proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            self.sentinels.append((port, proc))
        self.wait_until_ready(timeout)
        return self

    def stop(self) -> None:
        for _, proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for server in self.servers:
            server.stop(kill=True)

    def __enter__(self) -> RedisSet:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- where things are --------------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port, _ in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def _ask(self, *command: Any) -> Any:
        """Ask the Sentinels in turn; the first answer."""
        last: Exception | None = None
        for port, _ in self.sentinels:
            client = Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                return client.execute_command(*command)
            except RedisError as exc:
                last = exc
            finally:
                client.close()
        raise RuntimeError(f"no Sentinel answers: {last!r}")

    def primary_port(self) -> int:
        """The primary's port as the Sentinels see it now."""
        return int(self._ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])

    def server(self, port: int) -> EmbeddedRedis:
        return next(s for s in self.servers if s.port == port)

    def primary(self) -> EmbeddedRedis:
        return self.server(self.primary_port())

    def replicas_in_sync(self) -> int:
        """Replicas of the current primary whose link is up."""
        client = Redis(port=self.primary_port(), socket_timeout=1)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return sum(1 for key, value in info.items() if key.startswith("slave")
                   and isinstance(value, dict) and value.get("state") == "online")

    def wait_until_ready(self, timeout: float) -> None:
        """Until the replica is in sync and every Sentinel knows the replica and the others."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.replicas_in_sync() >= 1 and all(self._sentinel_ready(p)
                                                        for p, _ in self.sentinels):
                    return
            except (RedisError, RuntimeError, StopIteration):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis set did not become ready within {timeout} s "
                                   f"(logs in {self.directory})")
            time.sleep(0.1)

    def _sentinel_ready(self, port: int) -> bool:
        client = Redis(port=port, socket_timeout=1, decode_responses=True)
        try:
            master = client.execute_command("SENTINEL", "MASTER", SERVICE)
            fields = dict(zip(master[0::2], master[1::2])) if isinstance(master, list) \
                else master
            return int(fields["num-slaves"]) >= 1 and \
                int(fields["num-other-sentinels"]) >= self.sentinel_count - 1
        finally:
            client.close()

    # -- faults ------------------------------------------------------------------------------

    def kill_primary(self) -> EmbeddedRedis:
        """``kill -9`` of the current primary; returns it (stopped)."""
        victim = self.primary()
        victim.stop(kill=True)
        return victim

    def wait_for_promotion(self, old_port: int, timeout: float = 60.0) -> float:
        """Until the Sentinels name a new primary that answers as one; seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(RedisError, RuntimeError):
                port = self.primary_port()
                if port != old_port:
                    client = Redis(port=port, socket_timeout=1)
                    try:
                        if client.info("replication").get("role") == "master":
                            return time.monotonic() - started
                    finally:
                        client.close()
            time.sleep(0.05)
        raise RuntimeError(f"no replica was promoted within {timeout} s "
                           f"(Sentinel logs in {self.directory})")

    def bring_back(self, server: EmbeddedRedis, timeout: float = 60.0) -> None:
        """Start a killed server again as a replica of the current primary, as an orchestrator
        replacing a dead Redis does (the Sentinels would also turn it into one, after their
        next INFO round, up to 10 s later). Returns once it is in sync."""
        server.extra_args = ["--replicaof", "127.0.0.1", str(self.primary_port())]
        server.start()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RedisError, RuntimeError, StopIteration):
                if self.replicas_in_sync() >= 1:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the old primary did not rejoin as a replica within "
                                   f"{timeout} s (logs in {self.directory})")
            time.sleep(0.1)
