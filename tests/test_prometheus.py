"""A real Prometheus scraping real multi-worker quartchat servers, and the dashboard.

Two `quartchat serve` processes with two workers each (Redis + a MariaDB
database of their own) get a few seconds of traffic: posts from clients on
both servers into one room, a replay with ``since_seq``, history, error
frames and rate-limited frames. Prometheus (its own config, port and TSDB
under tmp_path) scrapes both every second. Then every target expression of
every panel in ``assets/quartchat.json`` is evaluated through Prometheus's
HTTP API, and each must return data; the values are printed per panel.

Also checked on the way: ``/metrics`` on either worker of a server reports
both workers' counts (prometheus-client multiprocess mode), and the launcher
empties a user-given ``PROMETHEUS_MULTIPROC_DIR`` at start.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from .cluster import Cluster
from .servers import ROOT, ChatClient, ServerProcess, free_port

DASHBOARD = ROOT / "assets" / "quartchat.json"
# What Grafana would substitute; rate windows must hold at least two 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "1s", "$__range": "5m"}


# ---- helpers --------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included; rows themselves have no query."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def expand(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr}"
    return expr


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def scrape(server: ServerProcess) -> dict[str, float]:
    """One GET /metrics: sample name with labels -> value."""
    text = http_text(server.http + "/metrics")
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def per_worker(path: Path, sample: str) -> dict[int, float]:
    """A counter's value in each worker's own multiprocess file (pid -> value)."""
    out: dict[int, float] = {}
    for f in path.glob("counter_*.db"):
        pid = int(f.stem.rsplit("_", 1)[1])
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(f)):
            _metric, name, labels, _help = json.loads(key)
            if name == sample and not labels:
                out[pid] = out.get(pid, 0.0) + value
    return out


class Prometheus:
    """A prometheus server of the test's own."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (ops/ensure-services.sh installs it)"
        self.port = free_port()
        self.workdir = workdir
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [
                {
                    "job_name": "quartchat",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.args = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                http_text(self.url + "/-/ready", timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"prometheus not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_text(url))
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_up(self) -> list[str]:
        body = json.loads(http_text(self.url + "/api/v1/targets"))
        return [
            t["labels"]["instance"] for t in body["data"]["activeTargets"] if t["health"] == "up"
        ]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _stale_metrics_file(path: Path) -> None:
    """What a previous run leaves behind: a dead worker's counter file."""
    path.mkdir(parents=True, exist_ok=True)
    stale = MmapedDict(str(path / "counter_999999.db"))
    name = "quartchat_connections_opened"
    stale.write_value(
        mmap_key(name, name + "_total", [], [], "WebSocket connections accepted"), 100_000.0, 0.0
    )
    stale.close()


# ---- traffic ---------------------------------------------------------------------------


async def traffic(a: ServerProcess, b: ServerProcess, seconds: float) -> list[ChatClient]:
    """Posts from both servers into one room, a replay, history, errors, rate limiting.

    Returns the clients left open (one per server)."""
    room = "prom"
    members = [
        await ChatClient(url, f"m{i}").connect()
        for i, url in enumerate([a.url, b.url, a.url, b.url])
    ]
    for m in members:
        await m.join(room)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def post(m: ChatClient) -> None:
        n = 0
        while loop.time() < deadline:
            await m.send(
                {
                    "action": "message",
                    "room_id": room,
                    "content": f"{m.sender} #{n}",
                    "client_msg_id": f"{m.sender}-{n}",
                }
            )
            n += 1
            await asyncio.sleep(0.08)

    posters = [asyncio.create_task(post(m)) for m in members]
    await asyncio.sleep(seconds / 3)
    # A reconnecting client: everything after seq 5 is replayed from the store.
    late = await ChatClient(b.url, "late").connect()
    await late.join(room, since_seq=5)
    await late.wait_for(lambda: len(late.of("message", room)) >= 20)
    await late.send({"action": "history", "room_id": room, "limit": 10})
    await late.wait_for(lambda: bool(late.of("history")))
    # Client mistakes: not JSON, a post to a room not joined.
    oops = await ChatClient(a.url, "oops").connect()
    await oops.send({"action": "message", "room_id": "elsewhere", "content": "hi"})
    await oops.ws.send("this is not json")
    await oops.wait_for(lambda: len(oops.of("error")) >= 2)
    assert {e["code"] for e in oops.of("error")} == {"not_joined", "invalid_json"}
    # A burst far over the rate limit (burst 20).
    burst = await ChatClient(b.url, "burst").connect()
    for _ in range(40):
        await burst.send({"action": "ping"})
    await burst.wait_for(lambda: len(burst.of("pong")) + len(burst.of("error")) >= 40)
    assert any(e["code"] == "rate_limited" for e in burst.of("error"))
    await asyncio.gather(*posters)
    for c in (*members[2:], late, oops, burst):
        await c.close()
    # Every post acked before the clients go (their ack may still be on the way).
    for m in members[:2]:
        await m.wait_for(lambda m=m: len(m.of("ack")) > 0)
    return members[:2]


# ---- tests ---------------------------------------------------------------------------


def test_ops_files_are_valid_and_point_at_the_compose_services() -> None:
    prom = ROOT / "ops" / "prometheus.yml"
    if shutil.which("promtool"):
        out = subprocess.run(
            ["promtool", "check", "config", str(prom)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load(prom.read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["app1:8080", "app2:8080"]

    grafana = ROOT / "ops" / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((grafana / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert (ds["uid"], ds["type"], ds["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    (provider,) = yaml.safe_load((grafana / "dashboards" / "quartchat.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] == "quartchat"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus" and target["expr"], panel["title"]


async def test_prometheus_scrapes_a_cluster_and_every_panel_has_data(tmp_path: Path) -> None:
    started = time.monotonic()
    user_dir = tmp_path / "prom-multiproc"
    _stale_metrics_file(user_dir)
    cluster = Cluster(
        tmp_path, extra_env={"QUARTCHAT_RATE_PER_S": "50", "QUARTCHAT_RATE_BURST": "20"}
    )
    prometheus: Prometheus | None = None
    try:
        # Server a: PROMETHEUS_MULTIPROC_DIR given (emptied at start, readable here);
        # server b: none given (the launcher makes and removes a temporary one).
        env = cluster.env()
        a = ServerProcess(
            tmp_path, {**env, "PROMETHEUS_MULTIPROC_DIR": str(user_dir)}, workers=2, name="app1"
        )
        b = ServerProcess(tmp_path, env, workers=2, name="app2")
        b.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cluster.servers += [a, b]
        instances = sorted([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
        # Prometheus first: it starts scraping only some seconds after it is ready.
        prometheus = Prometheus(tmp_path, instances).start()
        a.start()
        b.start()
        assert not (user_dir / "counter_999999.db").exists(), "stale files are removed at start"
        deadline = time.monotonic() + 20
        while sorted(prometheus.targets_up()) != instances:
            assert time.monotonic() < deadline, f"targets not up:\n{prometheus.log()}"
            await asyncio.sleep(0.2)

        # Both workers of server a get connections (the kernel hands them out unevenly).
        opened = "quartchat_connections_opened_total"
        for i in range(200):
            counts = per_worker(user_dir, opened)
            if len(counts) == 2 and all(counts.values()):
                break
            c = await ChatClient(a.url, f"spread{i}").connect()
            await c.close()
        assert len(counts) == 2 and all(counts.values()), counts

        kept = await traffic(a, b, seconds=6.0)

        # Multiprocess aggregation: whichever worker answers, it reports both.
        counts = per_worker(user_dir, opened)
        assert len(counts) == 2 and all(counts.values()), counts
        deadline = time.monotonic() + 5
        while scrape(a)["quartchat_connections_open{}"] != 1:  # closes still finishing
            assert time.monotonic() < deadline, scrape(a)["quartchat_connections_open{}"]
            await asyncio.sleep(0.1)
        for _ in range(8):
            got = scrape(a)
            assert got[opened + "{}"] == sum(counts.values()), (got[opened + "{}"], counts)
            assert got["quartchat_connections_open{}"] == 1, "one client still open on a"
            assert got["quartchat_broker_up{}"] == 1
        print(f"\nserver a workers' {opened}: {counts}; /metrics on a: {sum(counts.values())}")

        # Two more scrapes after the traffic, then every panel's every query.
        await asyncio.sleep(2.5)
        assert sorted(prometheus.targets_up()) == instances
        dashboard = json.loads(DASHBOARD.read_text())
        exposed = set(scrape(a)) | set(scrape(b))
        exposed_names = {key.split("{")[0] for key in exposed}
        empty: list[str] = []
        nan: list[str] = []
        print("panel values (Prometheus /api/v1/query, $__rate_interval=30s):")
        for panel in panels(dashboard):
            print(f"- {panel['title']}")
            for target in panel["targets"]:
                expr = expand(target["expr"])
                for name in re.findall(r"\bquartchat_[a-z_]+\b", expr):
                    assert name in exposed_names, f"{panel['title']}: {name} is not exposed"
                result = prometheus.query(expr)
                if not result:
                    empty.append(f"{panel['title']}: {expr}")
                values = []
                for series in result:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(series["metric"].items()))
                    number = float(series["value"][1])
                    if math.isnan(number):
                        nan.append(f"{panel['title']}: {expr} {labels}")
                    values.append(f"{labels or target.get('legendFormat', '')}={number:.4g}")
                print(f"    {target.get('legendFormat', '')}: {'; '.join(values) or 'NO DATA'}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        assert not nan, "panels with NaN (no observations in the window):\n" + "\n".join(nan)

        # A few values the traffic must have moved.
        def one(expr: str) -> float:
            assert prometheus is not None
            (series,) = prometheus.query(expr)
            return float(series["value"][1])

        assert one('sum(quartchat_errors_sent_total{code="rate_limited"})') >= 1
        assert one('sum(quartchat_errors_sent_total{code="invalid_json"})') == 1
        assert one("sum(quartchat_rate_limited_frames_total)") >= 1
        assert one("sum(quartchat_replayed_messages_total)") >= 20
        assert one("sum(quartchat_messages_stored_total)") >= 100
        assert one("sum(quartchat_connections_open)") == 2
        assert one("count(quartchat_broker_up == 1)") == 2
        for c in kept:
            await c.close()
        print(f"took {time.monotonic() - started:.1f}s")
    finally:
        if prometheus is not None:
            prometheus.stop()
        cluster.close()
