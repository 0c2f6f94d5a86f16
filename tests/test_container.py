"""The container recipe without a Docker engine: the Dockerfile read point by point, then
rehearsed (its install step run into a fresh virtual environment as an unprivileged user, the
entrypoint started with the image's environment, the HEALTHCHECK command run against it), and the
compose and Kubernetes examples validated.

The rehearsal runs the proxy inside a private network namespace that holds nothing but loopback:
the image listens on 0.0.0.0, which must never mean this machine's real interfaces.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from proxy.config import OPTIONS, ConfigError, load
from tests.fakes import REFRESH_TOKEN

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
PINNED_SLIM_PYTHON = re.compile(r"^python:\d+\.\d+\.\d+-slim-[a-z]+$")
# The python image's PATH, which the Dockerfile's ENV PATH extends.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = 65534
CLIENT_TOKEN = "client-token-for-the-container-rehearsal"
# pip downloads kept between rehearsals (the Dockerfile itself builds without a cache).
PIP_CACHE = Path(tempfile.gettempdir()) / "squirro-proxy-rehearsal-pip-cache"


# --- reading the Dockerfile ----------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... stage: its base, name, instructions and the ARG/ENV values it sets."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def expand(text: str, values: dict[str, str]) -> str:
    """Docker's $VAR / ${VAR} substitution."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))",
                  lambda m: values.get(m.group(1) or m.group(2), ""), text)


def read_stages() -> list[Stage]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
            continue
        if instruction == "COMMENT" or not stages:
            continue
        stage = stages[-1]
        stage.instructions.append((instruction, value))
        scope = {"PATH": BASE_PATH, **stage.args, **stage.env}
        if instruction == "ARG":
            key, _, default = value.partition("=")
            stage.args[key] = default
        elif instruction == "ENV":
            for token in shlex.split(value):
                key, _, raw = token.partition("=")
                stage.env[key] = expand(raw, scope)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_stages()


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)
    return parsed


def healthcheck_argv(stage: Stage) -> list[str]:
    [value] = stage.values("HEALTHCHECK")
    _, _, command = value.partition("CMD")
    return exec_form(command.strip())


def test_two_stages_on_the_same_pinned_slim_python(stages: list[Stage]) -> None:
    """Multi-stage; both stages on one slim Python image pinned to a patch version."""
    assert [s.name for s in stages] == ["build", None]
    for stage in stages:
        assert PINNED_SLIM_PYTHON.match(stage.base), stage.base
    assert stages[0].base == stages[1].base  # the environment's interpreter path must match


def test_only_the_build_stage_installs(stages: list[Stage]) -> None:
    """The package is installed in the build stage; the final stage copies the environment and
    has no compiler, package manager download or pip install."""
    build, final = stages
    assert any("pip" in r and " install " in r for r in build.values("RUN"))
    assert final.values("ADD") == []
    for copy in final.values("COPY"):
        assert copy.startswith("--from=build "), copy
    for run in final.values("RUN"):
        for banned in (" install ", "apt-get", "gcc", "build-essential", "curl", "wget"):
            assert banned not in run, (banned, run)
    assert "pip uninstall" in " ".join(final.values("RUN"))  # the base image's own pip goes


def test_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    """A numeric, non-zero USER (so runAsNonRoot can check it), created in the image."""
    final = stages[-1]
    [user] = final.values("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert f"--uid {uid}" in " ".join(final.values("RUN"))


def test_entrypoint_port_and_no_command(stages: list[Stage]) -> None:
    """Exec-form ENTRYPOINT squirro-proxy, EXPOSE 8080, and no CMD: configuration comes from
    the environment only."""
    final = stages[-1]
    [entrypoint] = final.values("ENTRYPOINT")
    assert exec_form(entrypoint) == ["squirro-proxy"]
    assert final.values("EXPOSE") == ["8080"]
    assert final.values("CMD") == []


def test_healthcheck_asks_healthy_with_python(stages: list[Stage]) -> None:
    """The HEALTHCHECK runs Python (slim images have no curl) against /-/healthy."""
    argv = healthcheck_argv(stages[-1])
    assert argv[:2] == ["python", "-c"] and "/-/healthy" in argv[2]
    text = DOCKERFILE.read_text()
    assert "curl" not in text.replace("no curl", "") and "wget" not in text


def test_image_environment_is_secure_by_default(stages: list[Stage], tmp_path: Path) -> None:
    """The image listens on 0.0.0.0, bakes in no secret, and refuses to start without a client
    token; with the documented secret files it loads."""
    env = stages[-1].env
    assert env["SQUIRRO_PROXY_HOST"] == "0.0.0.0" and env["SQUIRRO_PROXY_PORT"] == "8080"
    secret_names = {"SQUIRRO_TOKEN", "SQUIRRO_PROXY_CLIENT_TOKEN", "SQUIRRO_PROXY_CLIENT_SECRET"}
    assert not secret_names & set(env)

    base = {**env, "SQUIRRO_CLUSTER": "https://squirro.example.com",
            "SQUIRRO_TOKEN_FILE": str(_secret(tmp_path / "token", REFRESH_TOKEN))}
    with pytest.raises(ConfigError) as refused:
        load([], base, cwd=tmp_path)
    assert "client token" in str(refused.value)
    settings = load([], {**base, "SQUIRRO_PROXY_CLIENT_TOKEN_FILE": str(
        _secret(tmp_path / "client", CLIENT_TOKEN))}, cwd=tmp_path)
    assert settings.host == "0.0.0.0" and settings.client_token is not None


def _secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o400)
    return path


# --- .dockerignore -------------------------------------------------------------------------------


def dockerignore_includes(relative: str) -> bool:
    """Whether the build context holds `relative`, by .dockerignore's rules (last match wins;
    a pattern that matches a folder covers what is inside)."""
    included = True
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        alternatives = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            included = negate
    return included


@pytest.mark.parametrize(
    ("path", "included"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("proxy/app.py", True),
        ("proxy/status.html", True),
        (".env", False),
        (".git/config", False),
        ("tests/test_ops.py", False),
        (".venv/bin/python", False),
        ("proxy/__pycache__/app.cpython-311.pyc", False),
        ("config/kubernetes.yaml", False),
        ("secrets/squirro_token", False),
    ],
)
def test_dockerignore_keeps_the_context_to_what_the_image_needs(
    path: str, included: bool
) -> None:
    """Secrets, tests, git history and caches never enter the build context."""
    assert dockerignore_includes(path) is included


# --- the rehearsal -------------------------------------------------------------------------------


class Lines:
    """A process's output lines, collected by a thread so a test can wait for one."""

    def __init__(self, stream: Any) -> None:
        self.seen: list[str] = []
        self.ended = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for raw in stream:
            self._queue.put(raw.decode(errors="replace"))
        self._queue.put(None)

    def finish(self, timeout: float = 10) -> None:
        """Collect the rest, up to the end of the stream."""
        while not self.ended:
            line = self._queue.get(timeout=timeout)
            if line is None:
                self.ended = True
            else:
                self.seen.append(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.seen:
            if match := regex.search(line):
                return match
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                self.ended = True
                raise AssertionError(f"ended before {pattern!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            if match := regex.search(line):
                return match


@dataclass
class Sandbox:
    """A network namespace with only loopback, held open by a sleeping process."""

    holder: subprocess.Popen[bytes]

    def command(self, argv: list[str], unprivileged: bool = False) -> list[str]:
        drop = [f"--setuid={NOBODY}", f"--setgid={NOBODY}"] if unprivileged else []
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *drop, "--", *argv]

    def run(self, argv: list[str], env: dict[str, str], unprivileged: bool = False,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv, unprivileged), env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)


@dataclass
class Rehearsal:
    root: Path
    venv: Path
    env: dict[str, str]  # the final stage's ENV, with the rehearsal's paths
    entrypoint: list[str]
    healthcheck: list[str]
    sandbox: Sandbox
    cluster_port: int
    build_log: str


def _pass_through() -> dict[str, str]:
    """What pip needs from this machine to reach its index (proxies, certificates, mirrors)."""
    keep = ("PIP_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
            "no_proxy", "SSL_CERT_", "REQUESTS_CA_BUNDLE")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def _build(stages: list[Stage], root: Path) -> tuple[Path, str]:
    """Run the build stage's RUN steps as nobody, with the context .dockerignore allows."""
    build = stages[0]
    [workdir] = build.values("WORKDIR")
    src = root / workdir.strip("/")
    for copy in build.values("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            origin = REPO / source
            files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*")
                                                            if p.is_file())
            for path in files:
                relative = str(path.relative_to(REPO))
                if dockerignore_includes(relative):
                    (src / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, src / relative)
    venv = root / "venv"
    bin_dir = root / "bin"
    bin_dir.mkdir()
    # Debian's interpreter stands in for the image's: nobody cannot reach one under /root.
    (bin_dir / "python").symlink_to("/usr/bin/python3")
    (root / "home").mkdir()
    PIP_CACHE.mkdir(exist_ok=True)
    for path in (root, PIP_CACHE, *root.rglob("*")):
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    env = {
        **_pass_through(), **build.env,
        "VENV": str(venv), "HOME": str(root / "home"), "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PIP_CACHE_DIR": str(PIP_CACHE),
    }
    env.pop("PIP_NO_CACHE_DIR", None)
    log = []
    for run in build.values("RUN"):
        done = subprocess.run(["sh", "-c", run], cwd=src, env=env, user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, text=True, timeout=240,
                              check=False)
        log.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"RUN {run}\n{done.stdout}\n{done.stderr}"
    return venv, "".join(log)


CLUSTER_SCRIPT = """
import asyncio
from aiohttp import web
from tests.fakes import FakeCluster

async def main():
    runner = web.AppRunner(FakeCluster().app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def rehearsal(stages: list[Stage]) -> Iterator[Rehearsal]:
    """The image rehearsed: built as nobody, plus a loopback-only sandbox with a fake cluster."""
    assert os.geteuid() == 0, ("the rehearsal runs as root, as CI does: it drops to nobody and "
                               "creates a private network namespace")
    for tool in ("unshare", "nsenter", "ip"):
        assert shutil.which(tool), f"{tool} (util-linux / iproute2) is needed"
    root = Path(tempfile.mkdtemp(prefix="squirro-proxy-rehearsal-"))
    root.chmod(0o755)
    holder = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    cluster: subprocess.Popen[bytes] | None = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        sandbox = Sandbox(holder)
        venv, log = _build(stages, root)
        cluster = subprocess.Popen(
            sandbox.command([sys.executable, "-c", CLUSTER_SCRIPT]),
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        )
        assert cluster.stdout is not None
        port = int(cluster.stdout.readline())
        final = stages[-1]
        env = dict(final.env)  # the image's ENV, its virtual environment moved to ours
        env["PATH"] = env["PATH"].replace(final.args["VENV"], str(venv))
        [entrypoint] = final.values("ENTRYPOINT")
        yield Rehearsal(root, venv, env, exec_form(entrypoint), healthcheck_argv(final),
                        sandbox, port, log)
    finally:
        for proc in (cluster, holder):
            if proc is not None:
                proc.kill()
                proc.wait()
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
        shutil.rmtree(root, ignore_errors=True)


def _secrets(rehearsal: Rehearsal, client_token: bool = True) -> dict[str, str]:
    folder = rehearsal.root / "secrets"
    folder.mkdir(exist_ok=True)
    files = {"SQUIRRO_TOKEN_FILE": _secret_for_nobody(folder / "token", REFRESH_TOKEN)}
    if client_token:
        files["SQUIRRO_PROXY_CLIENT_TOKEN_FILE"] = _secret_for_nobody(folder / "client",
                                                                      CLIENT_TOKEN)
    os.chown(folder, NOBODY, NOBODY)
    return {k: str(v) for k, v in files.items()}


def _secret_for_nobody(path: Path, value: str) -> Path:
    if not path.exists():
        path.write_text(value + "\n")
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o400)
    return path


CLIENT_SCRIPT = """
import json, sys, urllib.error, urllib.request
url, headers = sys.argv[1], json.loads(sys.argv[2])
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"""


def _get(rehearsal: Rehearsal, path: str, headers: dict[str, str]) -> tuple[int, str]:
    done = rehearsal.sandbox.run(
        [sys.executable, "-c", CLIENT_SCRIPT, f"http://127.0.0.1:8080{path}",
         json.dumps(headers)], env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    status, _, body = done.stdout.partition(" ")
    return int(status), body


@pytest.mark.timeout(300)
def test_rehearsed_environment_holds_the_package_and_no_pip(rehearsal: Rehearsal) -> None:
    """The build step installs squirro-proxy (with uvloop) and leaves no pip behind."""
    assert (rehearsal.venv / "bin" / "squirro-proxy").exists()
    site = next((rehearsal.venv / "lib").glob("python3*/site-packages"))
    names = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"squirro_proxy", "aiohttp", "uvloop", "prometheus_client"} <= names
    assert "pip" not in names and not (rehearsal.venv / "bin" / "pip").exists()


@pytest.mark.timeout(300)
def test_rehearsed_entrypoint_serves_and_the_healthcheck_passes(rehearsal: Rehearsal) -> None:
    """The entrypoint, as nobody with the image's environment and the documented secret files,
    serves on 0.0.0.0:8080 (inside the sandbox); the HEALTHCHECK command succeeds; clients need
    the client token; probes do not; SIGTERM ends it with 0, after which the check fails."""
    env = {**rehearsal.env, **_secrets(rehearsal),
           "SQUIRRO_CLUSTER": f"http://127.0.0.1:{rehearsal.cluster_port}"}
    proc = subprocess.Popen(rehearsal.sandbox.command(rehearsal.entrypoint, unprivileged=True),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = Lines(proc.stderr)
    try:
        started = lines.wait_for(r'"event": "squirro-proxy listening on (http://[\d.:]+)')
        assert started.group(1) == "http://0.0.0.0:8080"
        # JSON lines, as the image asks for with SQUIRRO_PROXY_LOG_FORMAT=json.
        assert all(line.startswith("{") for line in lines.seen)

        check = rehearsal.sandbox.run(rehearsal.healthcheck, env=env, unprivileged=True)
        assert check.returncode == 0, check.stderr

        status, _ = _get(rehearsal, "/api/topic/v0/squirro_demo/projects", {})
        assert status == 401
        status, body = _get(rehearsal, "/api/topic/v0/squirro_demo/projects",
                            {"Authorization": f"Bearer {CLIENT_TOKEN}"})
        assert status == 200
        forwarded = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert forwarded["authorization"].startswith("Bearer access-")
        status, _ = _get(rehearsal, "/-/ready", {"Host": "10.42.0.7:8080"})  # as kubelet asks
        assert status == 200

        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.finish()
        assert proc.stderr is not None
        proc.stderr.close()
    after = rehearsal.sandbox.run(rehearsal.healthcheck, env=env, unprivileged=True)
    assert after.returncode != 0
    output = "".join(lines.seen)
    assert REFRESH_TOKEN not in output and CLIENT_TOKEN not in output


@pytest.mark.timeout(300)
def test_rehearsed_image_refuses_to_start_without_a_client_token(rehearsal: Rehearsal) -> None:
    """Without a client token the image's 0.0.0.0 bind is refused: exit 2 and what to set."""
    env = {**rehearsal.env, **_secrets(rehearsal, client_token=False),
           "SQUIRRO_CLUSTER": f"http://127.0.0.1:{rehearsal.cluster_port}"}
    done = rehearsal.sandbox.run(rehearsal.entrypoint, env=env, unprivileged=True)
    assert done.returncode == 2
    assert "client token" in done.stderr and "SQUIRRO_PROXY_CLIENT_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


# --- compose and Kubernetes ----------------------------------------------------------------------


def _yaml(name: str) -> list[Any]:
    return list(yaml.safe_load_all((REPO / "config" / name).read_text()))


def _env_list(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_kubernetes_manifest_validates() -> None:
    """Every document passes kubernetes-validate (strict: no unknown fields)."""
    docs = _yaml("kubernetes.yaml")
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29", strict=True)


def test_kubernetes_sidecar_is_secure_and_probed() -> None:
    """The proxy sidecar: token and client token from Secrets mounted as folders (so rotation
    reaches the file), probes on /-/healthy and /-/ready, resource requests, non-root."""
    [deployment] = _yaml("kubernetes.yaml")
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    containers = {c["name"]: c for c in pod["containers"]}
    proxy, app = containers["squirro-proxy"], containers["app"]
    env = _env_list(proxy)
    assert "SQUIRRO_TOKEN" not in env and "SQUIRRO_PROXY_CLIENT_TOKEN" not in env
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert proxy["resources"]["requests"]["cpu"] and proxy["resources"]["requests"]["memory"]
    security = proxy["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    for variable in ("SQUIRRO_TOKEN_FILE", "SQUIRRO_PROXY_CLIENT_TOKEN_FILE"):
        folder = str(Path(env[variable]).parent)
        mount = mounts[folder]
        assert "subPath" not in mount and mount["readOnly"] is True
        assert "secret" in volumes[mount["name"]]
    # The app shares the client token and calls the proxy on the pod's loopback.
    app_mounts = {m["name"] for m in app["volumeMounts"]}
    assert mounts[str(Path(env["SQUIRRO_PROXY_CLIENT_TOKEN_FILE"]).parent)]["name"] in app_mounts
    assert "http://127.0.0.1:8080/" in " ".join(app["args"])


def test_compose_sidecar_is_consistent() -> None:
    """The compose example: secrets defined and mounted, the client token shared with the app,
    the service name allowed as Host, no port on the host's public interfaces."""
    [compose] = _yaml("docker-compose.yml")
    services, secrets = compose["services"], compose["secrets"]
    proxy, app = services["squirro-proxy"], services["app"]
    env = proxy["environment"]
    assert env["SQUIRRO_TOKEN_FILE"] == "/run/secrets/squirro_token"
    assert env["SQUIRRO_PROXY_CLIENT_TOKEN_FILE"] == "/run/secrets/squirro_proxy_client_token"
    assert "SQUIRRO_TOKEN" not in env and "SQUIRRO_PROXY_CLIENT_TOKEN" not in env
    for service in (proxy, app):
        for name in service["secrets"]:
            assert name in secrets and "file" in secrets[name]
    assert "squirro_proxy_client_token" in app["secrets"]
    assert "squirro-proxy" in env["SQUIRRO_PROXY_ALLOW_HOSTS"].split(",")
    assert "http://squirro-proxy:8080/" in " ".join(app["command"])
    assert app["depends_on"]["squirro-proxy"]["condition"] == "service_healthy"
    assert "/-/ready" in " ".join(proxy["healthcheck"]["test"])
    for port in proxy.get("ports", []):
        assert str(port).startswith("127.0.0.1:")
    assert proxy["build"]["context"] == ".."


def test_example_env_file_names_every_setting_with_its_default(tmp_path: Path) -> None:
    """config/squirro-proxy.env.example mentions every variable; each commented default is the
    real default; the file as shipped loads once a token is given."""
    example = REPO / "config" / "squirro-proxy.env.example"
    text = example.read_text()
    for option in OPTIONS:
        if option.env:
            assert re.search(rf"^#? ?{option.env}=", text, re.MULTILINE), option.env
    token = _secret(tmp_path / "token", REFRESH_TOKEN)
    base = load(["--env-file", str(example)], {"SQUIRRO_TOKEN_FILE": str(token)}, cwd=tmp_path)
    for line in text.splitlines():
        match = re.fullmatch(r"# (SQUIRRO_PROXY_\w+)=(.+)", line)
        if not match:
            continue
        option = next(o for o in OPTIONS if o.env == match.group(1))
        if option.default in (None, ()):
            continue  # an example value, not a default
        uncommented = tmp_path / "one.env"
        uncommented.write_text(f"SQUIRRO_CLUSTER=https://squirro.example.com\n{line[2:]}\n")
        settings = load(["--env-file", str(uncommented)], {"SQUIRRO_TOKEN_FILE": str(token)},
                        cwd=tmp_path)
        assert getattr(settings, option.name) == getattr(base, option.name), line
