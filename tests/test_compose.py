"""Static checks of the deployment files: docker-compose.yml, ops/Dockerfile,
ops/docker-entrypoint.sh, and their agreement with ops/nginx.conf,
ops/prometheus.yml, the Grafana provisioning and quartchat's settings.

There is no Docker engine here, so nothing is built or started by Docker; the
entrypoint runs under /bin/sh with a stand-in `quartchat`, and the wheel that
the Dockerfile's build stage makes is built from exactly the files it copies.
"""

from __future__ import annotations

import glob
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from quartchat.config import SETTINGS_DOC, Settings
from quartchat.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
ENTRYPOINT = ROOT / "ops" / "docker-entrypoint.sh"
NGINX_CONF = ROOT / "ops" / "nginx.conf"
PROMETHEUS_YML = ROOT / "ops" / "prometheus.yml"

# Names other files rely on (ops/prometheus.yml, ops/grafana/provisioning/...).
SERVICES = {"mysql", "redis", "migrate", "app1", "app2", "nginx", "prometheus", "grafana"}
APPS = ("app1", "app2")
APP_PORT = 8080
KNOWN_VARS = {var for var, _default, _doc in SETTINGS_DOC} | {"QUARTCHAT_HYPERCORN_CONFIG"}

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# ---- helpers ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        "docker-compose.yml: no `services` mapping"
    )
    return data


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable substitution, with ``env`` (default: nothing set)."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        if op in (":-",):
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            assert current, f"${{{name}}} is required: {arg}"
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return _INTERPOLATION.sub(sub, value)


def variables(value: str) -> list[tuple[str, str | None]]:
    """(name, operator) of every ${...} / $NAME in a compose string."""
    return [
        (m.group("name") or m.group("bare"), m.group("op"))
        for m in _INTERPOLATION.finditer(value)
        if m.group(0) != "$$"
    ]


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        env = {k: v for k, v in ((p[0], p[1] if len(p) > 1 else "") for p in pairs)}
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def ports(service: dict[str, Any]) -> list[tuple[int | None, int]]:
    """(published, target) of each port mapping."""
    out = []
    for item in service.get("ports") or []:
        if isinstance(item, dict):
            out.append(
                (int(item["published"]) if "published" in item else None, int(item["target"]))
            )
            continue
        parts = str(item).split("/")[0].split(":")
        out.append((int(parts[-2]) if len(parts) >= 2 else None, int(parts[-1])))
    return out


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path as written, container path) of each bind mount."""
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            if item.get("type") == "bind":
                out.append((item["source"], item["target"]))
            continue
        source, target = str(item).split(":")[:2]
        if source.startswith((".", "/", "~")):
            out.append((source, target))
    return out


def named_volumes(service: dict[str, Any]) -> list[str]:
    out = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            if item.get("type") == "volume":
                out.append(item["source"])
            continue
        source = str(item).split(":")[0]
        if ":" in str(item) and not source.startswith((".", "/", "~")):
            out.append(source)
    return out


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    assert test, "no healthcheck test"
    return " ".join(test) if isinstance(test, list) else str(test)


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def nginx_upstreams() -> dict[str, set[tuple[str, int]]]:
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    groups: dict[str, set[tuple[str, int]]] = {}
    for name, body in re.findall(r"\bupstream\s+(\S+)\s*\{([^}]*)\}", text):
        groups[name] = {
            (host, int(port))
            for host, port in re.findall(r"\bserver\s+([A-Za-z0-9_.-]+):(\d+)", body)
        }
    return groups


# ---- docker-compose.yml ----------------------------------------------------


def test_compose_parses_and_has_the_fixed_services() -> None:
    data = compose()
    missing = SERVICES - set(data["services"])
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"
    for name, service in data["services"].items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"


def test_every_mounted_or_built_path_exists() -> None:
    data = compose()
    problems = []
    for name, service in data["services"].items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            if not context.is_dir():
                problems.append(f"{name}: build context {context} is missing")
            dockerfile = build.get("dockerfile") if isinstance(build, dict) else "Dockerfile"
            if dockerfile and not (context / dockerfile).is_file():
                problems.append(f"{name}: dockerfile {dockerfile} is missing")
        for source, target in bind_mounts(service):
            path = ROOT / source
            if not path.exists():
                problems.append(f"{name}: mounts {source} -> {target}, but {source} does not exist")
        for volume in named_volumes(service):
            if volume not in (data.get("volumes") or {}):
                problems.append(f"{name}: named volume {volume} is not declared under `volumes:`")
    assert not problems, "\n".join(problems)


def test_mounts_and_ports_are_where_the_images_expect_them() -> None:
    services = compose()["services"]
    assert ("./ops/nginx.conf", "/etc/nginx/nginx.conf") in bind_mounts(services["nginx"])
    assert ("./ops/prometheus.yml", "/etc/prometheus/prometheus.yml") in bind_mounts(
        services["prometheus"]
    )
    assert ("./ops/grafana/provisioning", "/etc/grafana/provisioning") in bind_mounts(
        services["grafana"]
    )
    assert any(source == "./assets" for source, _ in bind_mounts(services["grafana"])), (
        "grafana: ./assets (the dashboards) is not mounted"
    )
    assert (8080, 80) in ports(services["nginx"]), "nginx: public port 8080 -> 80"
    assert (9090, 9090) in ports(services["prometheus"])
    assert (3000, 3000) in ports(services["grafana"])
    prom_args = " ".join(services["prometheus"].get("command") or [])
    if "--config.file" in prom_args:
        assert "--config.file=/etc/prometheus/prometheus.yml" in prom_args
    assert any(
        target == "/var/lib/mysql"
        for target in [str(v).split(":")[1] for v in services["mysql"].get("volumes") or []]
    ), "mysql: no volume for its data"
    mysql_image = services["mysql"]["image"]
    assert mysql_image.startswith(("mariadb:10.11", "mysql:8")), mysql_image
    assert services["redis"]["image"].startswith("redis:7")
    grafana_env = environment(services["grafana"])
    assert grafana_env.get("GF_SECURITY_ADMIN_PASSWORD"), (
        "grafana admin password from the environment"
    )
    assert re.search(
        r"\$\{GRAFANA_ADMIN_PASSWORD[:}-]",
        str(services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]),
    )


def test_apps_migrate_and_database_settings() -> None:
    services = compose()["services"]
    for name in ("migrate", *APPS):
        build = services[name].get("build") or {}
        assert isinstance(build, dict) and build.get("dockerfile") == "ops/Dockerfile", (
            f"{name}: built from ops/Dockerfile"
        )
    assert services["migrate"]["command"] in (["migrate"], "migrate")
    for name in APPS:
        env = environment(services[name])
        assert env.get("QUARTCHAT_SERVER_ID") == name
        assert env.get("QUARTCHAT_WORKERS") == "2"
        assert env.get("QUARTCHAT_BIND") == f"0.0.0.0:{APP_PORT}"
        assert env.get("PROMETHEUS_MULTIPROC_DIR") == "/tmp/quartchat-metrics"
        assert services[name]["command"] in (["serve"], "serve")
    for name in ("migrate", *APPS):
        env = environment(services[name])
        db = urlsplit(env["QUARTCHAT_DATABASE_URL"])
        assert db.scheme == "mysql+aiomysql", f"{name}: {env['QUARTCHAT_DATABASE_URL']}"
        assert (db.hostname, db.port or 3306, db.path) == ("mysql", 3306, "/quartchat")
        assert db.username == environment(services["mysql"]).get(
            "MARIADB_USER", environment(services["mysql"]).get("MYSQL_USER")
        )
        assert env["QUARTCHAT_BROKER_URL"] == "redis://redis:6379/0"
    mysql_env = environment(services["mysql"])
    assert (mysql_env.get("MARIADB_DATABASE") or mysql_env.get("MYSQL_DATABASE")) == "quartchat"
    db_password = urlsplit(environment(services["app1"])["QUARTCHAT_DATABASE_URL"]).password
    assert db_password == (mysql_env.get("MARIADB_PASSWORD") or mysql_env.get("MYSQL_PASSWORD"))
    assert "utf8mb4" in " ".join(services["mysql"].get("command") or []), (
        "mysql: utf8mb4 by default"
    )


def test_health_checks_and_start_order() -> None:
    services = compose()["services"]
    assert "mysqladmin ping" in healthcheck_text(services["mysql"])
    assert "redis-cli ping" in healthcheck_text(services["redis"])
    for name in APPS:
        assert f"127.0.0.1:{APP_PORT}/readyz" in healthcheck_text(services[name])
        test = services[name]["healthcheck"]["test"]
        if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
        assert depends_on(services[name]) == {
            "migrate": "service_completed_successfully",
            "mysql": "service_healthy",
            "redis": "service_healthy",
        }
        assert services[name].get("restart") in ("unless-stopped", "always", "on-failure")
        # SIGTERM drains for up to QUARTCHAT_DRAIN_TIMEOUT_S (10 s) + hypercorn's graceful_timeout.
        grace = str(services[name].get("stop_grace_period", "10s"))
        assert int(re.fullmatch(r"(\d+)s", grace).group(1)) >= 15, grace  # type: ignore[union-attr]
    assert depends_on(services["migrate"]) == {
        "mysql": "service_healthy",
        "redis": "service_healthy",
    }
    assert str(services["migrate"].get("restart", "no")) == "no", "migrate is a one-shot"
    assert depends_on(services["nginx"]) == {"app1": "service_healthy", "app2": "service_healthy"}
    for name, service in services.items():
        for dep in depends_on(service):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for dep, condition in depends_on(service).items():
            if condition == "service_healthy":
                hc = services[dep].get("healthcheck") or {}
                assert hc.get("test") and not hc.get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )


def test_every_quartchat_variable_is_a_real_setting_and_valid() -> None:
    data = compose()
    used = {m for s in strings(data) for m in re.findall(r"\bQUARTCHAT_[A-Z0-9_]+", s)}
    used |= {
        m
        for _, args in dockerfile_instructions()
        for m in re.findall(r"\bQUARTCHAT_[A-Z0-9_]+", args)
    }
    used |= set(re.findall(r"\bQUARTCHAT_[A-Z0-9_]+", ENTRYPOINT.read_text()))
    unknown = used - KNOWN_VARS
    assert not unknown, (
        f"not quartchat settings: {sorted(unknown)} (see quartchat.config.SETTINGS_DOC)"
    )
    # Every interpolation has a default: `docker compose up` works without a .env.
    for s in strings(data):
        for name, op in variables(s):
            assert op in (":-", "-"), f"${{{name}}} has no default in {s!r}"
    # The values themselves pass quartchat's own validation.
    for name, service in data["services"].items():
        env = {k: v for k, v in environment(service).items() if k.startswith("QUARTCHAT_")}
        if env:
            try:
                Settings.from_env(env, env_file=None)
            except ConfigError as exc:
                raise AssertionError(f"{name}: {exc}") from None


# ---- agreement with ops/nginx.conf and ops/prometheus.yml ------------------


def test_nginx_upstreams_are_the_compose_apps() -> None:
    services = compose()["services"]
    groups = nginx_upstreams()
    assert groups, "ops/nginx.conf defines no upstream"
    expected = {(name, APP_PORT) for name in APPS}
    for group, servers in groups.items():
        assert servers == expected, (
            f"nginx upstream {group}: {sorted(servers)}, expected {sorted(expected)}"
        )
    for host, port in set().union(*groups.values()):
        assert host in services, f"nginx upstream server {host} is not a compose service"
        bind = environment(services[host]).get("QUARTCHAT_BIND", "")
        assert bind.endswith(f":{port}"), f"{host} listens on {bind}, nginx expects :{port}"
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    for target in re.findall(r"proxy_pass\s+http://([^/;\s]+)", text):
        assert target in groups, f"proxy_pass to {target}, which is no upstream"
    (listen,) = re.findall(r"^\s*listen\s+(\d+)\s*;", text, flags=re.MULTILINE)
    assert (8080, int(listen)) in ports(services["nginx"])


def test_prometheus_scrapes_the_compose_apps() -> None:
    assert PROMETHEUS_YML.is_file(), (
        "ops/prometheus.yml is missing: docker-compose.yml mounts it into the prometheus "
        "service; it must scrape app1:8080 and app2:8080"
    )
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    services = compose()["services"]
    targets = {
        t
        for job in config.get("scrape_configs") or []
        for sc in job.get("static_configs") or []
        for t in sc.get("targets") or []
    }
    expected = {f"{name}:{APP_PORT}" for name in APPS}
    assert expected <= targets, (
        f"ops/prometheus.yml scrapes {sorted(targets)}, expected {sorted(expected)}"
    )
    for target in targets:
        host, _, port = target.rpartition(":")
        assert host in services, f"prometheus target {target}: no compose service {host}"
        if host in APPS:
            assert environment(services[host])["QUARTCHAT_BIND"].endswith(f":{port}")
    for job in config.get("scrape_configs") or []:
        if {
            t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []
        } & expected:
            assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisioning_agrees_with_the_mounts() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    provisioning = ROOT / "ops" / "grafana" / "provisioning"
    dashboards_target = dict(bind_mounts(grafana))["./assets"]
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in (yaml.safe_load(f.read_text()) or {}).get("providers") or []
    ]
    assert providers, "no Grafana dashboard provider under ops/grafana/provisioning/dashboards"
    paths = {p["options"]["path"].rstrip("/") for p in providers}
    assert dashboards_target.rstrip("/") in paths, (
        f"./assets is mounted at {dashboards_target}, the providers read {sorted(paths)}"
    )
    datasources = [
        d
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for d in (yaml.safe_load(f.read_text()) or {}).get("datasources") or []
    ]
    for ds in datasources:
        if ds.get("type") == "prometheus":
            url = urlsplit(ds["url"])
            assert url.hostname in services and (url.hostname == "prometheus"), ds["url"]
            assert any(target == url.port for _, target in ports(services["prometheus"])), ds["url"]
    assert list((ROOT / "assets").glob("*.json")), "no dashboard JSON in assets/"


# ---- ops/Dockerfile and ops/docker-entrypoint.sh ---------------------------


def test_dockerfile_copy_sources_exist_and_cover_the_package() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert froms and all(f.split()[0].startswith("python:3.11-slim") for f in froms), froms
    copied: list[str] = []
    for ins, args in instructions:
        if ins not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            continue
        *sources, _dest = words
        for source in sources:
            assert glob.glob(str(ROOT / source)), (
                f"ops/Dockerfile: COPY source {source} does not exist"
            )
            copied.append(source.rstrip("/"))
    # What `pip install .` reads: pyproject.toml, the readme, every package directory.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *pyproject["tool"]["setuptools"]["package-dir"].values(),
    }
    missing = {n for n in needed if n.rstrip("/") not in copied}
    assert not missing, (
        f"ops/Dockerfile does not copy {sorted(missing)} (needed by `pip install .`)"
    )
    assert "hypercorn.toml" in copied, "ops/Dockerfile: hypercorn.toml is not copied"


def test_dockerfile_runtime_settings() -> None:
    instructions = dockerfile_instructions()
    last_stage = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    users = [args for ins, args in last_stage if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        "the image runs as a non-root user"
    )
    assert any(ins == "EXPOSE" and "8080" in args.split() for ins, args in last_stage)
    (health,) = [args for ins, args in last_stage if ins == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    # Exec form must be valid JSON (Docker silently falls back to a shell otherwise).
    exec_form = json.loads(health.split(" CMD ", 1)[1])
    assert exec_form[:2] == ["python", "-c"], exec_form
    compile(exec_form[2], "HEALTHCHECK", "exec")
    env = " ".join(args for ins, args in last_stage if ins == "ENV")
    assert "QUARTCHAT_BIND=0.0.0.0:8080" in env
    assert "QUARTCHAT_HYPERCORN_CONFIG=/app/hypercorn.toml" in env
    (entry,) = [json.loads(args) for ins, args in last_stage if ins == "ENTRYPOINT"]
    (cmd,) = [json.loads(args) for ins, args in last_stage if ins == "CMD"]
    assert entry == ["docker-entrypoint.sh"] and cmd == ["migrate-and-serve"]
    copies = [shlex.split(args) for ins, args in last_stage if ins == "COPY"]
    assert any(
        c[-2:] == ["ops/docker-entrypoint.sh", "/usr/local/bin/docker-entrypoint.sh"]
        for c in copies
    ), "the entrypoint is copied onto PATH"
    assert os.access(ENTRYPOINT, os.X_OK), "ops/docker-entrypoint.sh is not executable"


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_dockerfile_healthcheck_probes_healthz_on_the_bind_port(status: int) -> None:
    (health,) = [args for ins, args in dockerfile_instructions() if ins == "HEALTHCHECK"]
    exec_form = json.loads(health.split(" CMD ", 1)[1])
    handler = type("Answer", (_Answer,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        env = {**os.environ, "QUARTCHAT_BIND": f"0.0.0.0:{port}"}
        result = subprocess.run(
            [sys.executable, *exec_form[1:]], env=env, capture_output=True, timeout=15, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == (status == 200), result.stderr.decode()[-500:]


@pytest.fixture
def fake_quartchat(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `quartchat` on PATH that records its arguments, one call per line."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    script = bindir / "quartchat"
    script.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    script.chmod(0o755)
    metrics = tmp_path / "metrics"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    return env, calls


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["migrate", "serve"]),
        (["migrate-and-serve", "--workers", "3"], ["migrate", "serve --workers 3"]),
        (["serve"], ["serve"]),
        (["migrate"], ["migrate"]),
        (["--bind", "0.0.0.0:9000"], ["serve --bind 0.0.0.0:9000"]),
    ],
)
def test_entrypoint_runs_the_right_commands(
    fake_quartchat: tuple[dict[str, str], Path], args: list[str], expected: list[str]
) -> None:
    env, calls = fake_quartchat
    metrics = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    metrics.mkdir()
    (metrics / "counter_123.db").write_text("stale")
    result = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args], env=env, capture_output=True, check=False, timeout=10
    )
    assert result.returncode == 0, result.stderr.decode()
    assert calls.read_text().splitlines() == expected
    assert metrics.is_dir() and not list(metrics.iterdir()), "stale metrics files are removed"


def test_entrypoint_runs_other_commands_as_given(
    fake_quartchat: tuple[dict[str, str], Path],
) -> None:
    env, calls = fake_quartchat
    result = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), "echo", "hello"],
        env=env,
        capture_output=True,
        check=False,
        timeout=10,
    )
    assert result.returncode == 0 and result.stdout == b"hello\n"
    assert not calls.exists()
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir(), "the metrics directory is created"


def test_entrypoint_stops_when_migrations_fail(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "quartchat").write_text('#!/bin/sh\n[ "$1" = migrate ] && exit 1\necho served\n')
    (bindir / "quartchat").chmod(0o755)
    result = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT)],
        capture_output=True,
        check=False,
        timeout=10,
        env={"PATH": f"{bindir}:/usr/bin:/bin"},
    )
    assert result.returncode != 0 and b"served" not in result.stdout


@pytest.mark.timeout(120)
def test_build_stage_files_make_a_complete_wheel(tmp_path: Path) -> None:
    """`pip wheel .` over exactly what the build stage copies (as ops/Dockerfile does)."""
    context = tmp_path / "src"
    context.mkdir()
    instructions = dockerfile_instructions()
    second_from = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"][1]
    for ins, args in instructions[:second_from]:
        if ins != "COPY":
            continue
        *sources, _dest = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                subprocess.run(["cp", "-r", str(src), str(context / src.name)], check=True)
            else:
                subprocess.run(["cp", str(src), str(context / src.name)], check=True)
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(context)],
        capture_output=True,
        check=False,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    (wheel,) = out.glob("quartchat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "quartchat/cli.py",
        "quartchat/migrations/env.py",
        "quartchat/migrations/script.py.mako",
        "quartchat/static/index.html",
        "quartchat/static/quartchat.js",
        "quartchat/static/app.js",
        "quartchat/static/app.css",
    ):
        assert needed in names, f"{needed} is not in the wheel"
    assert any(n.startswith("quartchat/migrations/versions/0001") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "quartchat = quartchat.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
