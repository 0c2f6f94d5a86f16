"""The processes a benchmark run starts: nginx as upstream and as peer, the proxies under test.

Every process is started in its own session (a Ctrl-C in the terminal reaches only the benchmark,
which then stops them in order) and registered, so `stop_all` can end each one by its pid.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NGINX = "/usr/sbin/nginx"

# Fixed secrets of the benchmark's own upstream: nothing real, but still never printed.
ACCESS_TOKEN = "bench-access-token-0123456789abcdef"
REFRESH_TOKEN = "bench-refresh-token-0123456789abcdef"
TOKEN_PATH = "/api/user/oauth2/token"
SMALL_PATH = "/api/topic/v0/bench/projects"
LARGE_PATH = "/large-1g.bin"
UPLOAD_PATH = "/upload"
LARGE_SIZE = 1024**3

SMALL_JSON = (
    '{"projects":[{"id":"Bv7Xk2QhRJ2-0bM4cYtU5w","title":"Benchmark","type":"topic",'
    '"locator":"squirro","created_at":"2024-05-01T10:00:00","modified_at":'
    '"2024-05-02T11:30:00","owner":"bench"}],"count":1}'
)
TOKEN_JSON = (
    '{"access_token":"' + ACCESS_TOKEN + '","refresh_token":"' + REFRESH_TOKEN + '",'
    '"user_id":"bench","session_id":"bench","role":"admin","tenant":"bench","expires_in":3600}'
)

_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nginx_head(name: str, tmp: Path, body_tmp: Path) -> str:
    temps = "\n".join(
        f"  {kind}_temp_path {(body_tmp if kind == 'client_body' else tmp) / (name + '-' + kind)};"
        for kind in _TEMP_DIRS
    )
    # One worker: the Python proxies are single processes on the same two cores, and a second
    # worker would mostly measure how many cores the machine has.
    return f"""
worker_processes 1;
daemon off;
master_process on;
pid {tmp / (name + '.pid')};
error_log {tmp / (name + '-error.log')} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
{temps}
"""


def upstream_conf(port: int, tmp: Path, body_tmp: Path, large_dir: Path) -> str:
    """The stand-in cluster: token endpoint, small JSON, 1 GiB file, upload sink."""
    auth = f'if ($http_authorization != "Bearer {ACCESS_TOKEN}") {{ return 401; }}'
    return _nginx_head("upstream", tmp, body_tmp) + f"""
  server {{
    listen 127.0.0.1:{port};
    location = {TOKEN_PATH} {{
      if ($request_method != POST) {{ return 405; }}
      default_type application/json;
      return 200 '{TOKEN_JSON}';
    }}
    location = {SMALL_PATH} {{
      {auth}
      default_type application/json;
      return 200 '{SMALL_JSON}';
    }}
    location = {LARGE_PATH} {{
      {auth}
      root {large_dir};
      default_type application/octet-stream;
    }}
    # The upload sink answers only after it has read the whole body: the proxy module buffers
    # the request body completely (to a tmpfs file) before it asks /sunk, which reports the
    # bytes read, so a client can check that nothing was cut short.
    location = {UPLOAD_PATH} {{
      {auth}
      client_max_body_size 0;
      client_body_buffer_size 1m;
      proxy_pass http://127.0.0.1:{port}/sunk;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Received $request_length;
    }}
    location = /sunk {{
      default_type application/json;
      return 200 '{{"request_length":$http_x_received}}';
    }}
  }}
}}
"""


def peer_conf(port: int, upstream_port: int, tmp: Path, body_tmp: Path) -> str:
    """What a user can have today: nginx with a hard-coded bearer header (and no refresh)."""
    return _nginx_head("peer", tmp, body_tmp) + f"""
  upstream cluster {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_pass http://cluster;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {ACCESS_TOKEN}";
      # Stream both ways, as the proxy under test does, with no spooling to disk; 64 KiB
      # buffers (instead of one page) nearly double its large-download throughput.
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
      proxy_buffer_size 64k;
      proxy_buffers 16 64k;
    }}
  }}
}}
"""


def plain_peer_conf(port: int, upstream_port: int, tmp: Path, body_tmp: Path) -> str:
    """nginx as a user writes it in five minutes: proxy_pass and the header, nothing tuned
    (HTTP/1.0 and a new connection to the upstream for every request, nginx's defaults)."""
    return _nginx_head("plain", tmp, body_tmp) + f"""
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{upstream_port};
      proxy_set_header Authorization "Bearer {ACCESS_TOKEN}";
    }}
  }}
}}
"""


UVLOOP_BLOCKER = '''\
"""Makes `import uvloop` fail, so the benchmark can run a process on asyncio's own loop."""
import sys


class _BlockUvloop:
    def find_spec(self, name, path=None, target=None):
        if name == "uvloop" or name.startswith("uvloop."):
            raise ImportError("uvloop is blocked by the benchmark")
        return None


sys.meta_path.insert(0, _BlockUvloop())
'''


def write_uvloop_blocker(tmp: Path) -> Path:
    """A directory whose sitecustomize blocks uvloop; put it first on PYTHONPATH."""
    path = tmp / "no-uvloop"
    path.mkdir(exist_ok=True)
    (path / "sitecustomize.py").write_text(UVLOOP_BLOCKER)
    return path


def large_file(directory: Path) -> Path:
    """The 1 GiB file: sparse, so it takes no disk, costs no time to make and reads from memory."""
    path = directory / LARGE_PATH.lstrip("/")
    with path.open("wb") as out:
        out.truncate(LARGE_SIZE)
    path.chmod(0o644)
    return path


@dataclass
class Server:
    """One process the benchmark runs: how to start it and how to tell it is serving."""

    name: str
    kind: str  # upstream | nginx | naive | squirro
    port: int
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    needs_auth: bool = False  # a request straight to the upstream carries the bearer itself
    ready_status: int = 200  # what the small request gets once the server is up
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_after: float = 0.0  # seconds from spawn to the first 200

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ACCESS_TOKEN}"} if self.needs_auth else {}

    def start(self, log_dir: Path, ready_timeout: float = 30.0) -> None:
        env = {**os.environ, **self.env}
        log = (log_dir / f"{self.name}.log").open("ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            list(self.argv), env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        _RUNNING.append(self)
        self.ready_after = wait_ready(self, ready_timeout)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self in _RUNNING:
            _RUNNING.remove(self)

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def rss(self) -> int:
        """Resident bytes of the process and its children (nginx: master and worker)."""
        if self.proc is None:
            return 0
        return tree_rss(self.proc.pid)


_RUNNING: list[Server] = []


def stop_all() -> None:
    for server in reversed(list(_RUNNING)):
        server.stop()


def _tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """The sum of `measure` over a process and its children (nginx: master and worker)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += measure(proc)
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes."""
    return int(_tree_sum(pid, lambda proc: proc.memory_info().rss))


def tree_cpu(pid: int) -> float:
    """CPU seconds (user and system) used so far."""
    return _tree_sum(pid, lambda proc: sum(proc.cpu_times()[:2]))


def get(server: Server, path: str = SMALL_PATH, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=server.headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_ready(server: Server, timeout: float) -> float:
    """Seconds from spawn until the server first answers the small request with 200."""
    deadline = time.perf_counter() + timeout
    last = "no answer"
    while time.perf_counter() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} at start-up; "
                               "see its log in the run directory")
        try:
            status = get(server, timeout=0.5)
        except OSError as exc:
            last = exc.__class__.__name__
        else:
            if status == server.ready_status:
                return time.perf_counter() - server.started_at
            last = f"status {status}"
        time.sleep(0.005)
    raise RuntimeError(f"{server.name} did not serve within {timeout:g} s ({last})")


def nginx_server(name: str, kind: str, conf: str, tmp: Path, port: int) -> Server:
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    return Server(name, kind, port, [NGINX, "-e", str(tmp / f"{name}-error.log"),
                                     "-p", str(tmp), "-c", str(path)])


def python_env(path: Path, uvloop: bool, blocker: Path) -> dict[str, str]:
    entries = [str(path)] if uvloop else [str(blocker), str(path)]
    return {"PYTHONPATH": os.pathsep.join(entries), "PYTHONDONTWRITEBYTECODE": "1"}


def naive_server(upstream: Server, uvloop: bool, blocker: Path) -> Server:
    port = free_port()
    return Server(
        "naive" if uvloop else "naive-asyncio", "naive", port,
        [sys.executable, str(HERE / "naive_proxy.py"), "--upstream", upstream.base,
         "--port", str(port), "--token", ACCESS_TOKEN],
        env=python_env(ROOT, uvloop, blocker),
    )


def floor_server(upstream: Server, blocker: Path) -> Server:
    port = free_port()
    return Server(
        "floor", "floor", port,
        [sys.executable, str(HERE / "floor_proxy.py"), "--upstream", upstream.base,
         "--port", str(port), "--token", ACCESS_TOKEN],
        env=python_env(ROOT, True, blocker),
    )


def squirro_server(name: str, path: Path, cluster: str, uvloop: bool, blocker: Path,
                   cwd: Path, extra: Sequence[str] = ()) -> Server:
    port = free_port()
    return Server(
        name if uvloop else f"{name}-asyncio", "squirro", port,
        [sys.executable, "-m", "proxy", "--cluster", cluster, "--token", REFRESH_TOKEN,
         "--port", str(port), "--log-level", "warning", *extra],
        env=python_env(path, uvloop, blocker),
        # An empty directory: no stray `.env` may change the settings.
        cwd=cwd,
    )


def check_uvloop_blocker(blocker: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import uvloop"], env=env, capture_output=True,
                           timeout=30, check=False)
    if probe.returncode == 0:
        raise RuntimeError("could not block uvloop (another sitecustomize wins?)")


def which(tool: str) -> str | None:
    return NGINX if tool == "nginx" and Path(NGINX).exists() else shutil.which(tool)
