"""A rotated token file takes effect without a restart: polled for changes, and on SIGHUP."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.app import TOKEN_FILE_WATCHER
from proxy.config import Secret
from proxy.secret_watch import TokenFileWatcher
from proxy.tokens import TokenError
from tests.conftest import Running, StartProxy
from tests.fakes import REFRESH_TOKEN, FakeCluster
from tests.helpers import until
from tests.test_ops import cli_process

NEW_TOKEN = "refresh-token-from-the-new-secret-0001"


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll every 50 ms instead of every second, to keep these tests quick."""
    monkeypatch.setattr("proxy.secret_watch.POLL_INTERVAL", 0.05)


def write(path: Path, text: str) -> None:
    """Replace the file the way editors and `kubectl` do: write aside, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def start_with_file(start_proxy: StartProxy, path: Path) -> Running:
    path.write_text(REFRESH_TOKEN + "\n")
    return await start_proxy(token_file=path, token=Secret(REFRESH_TOKEN))


async def get_ok(client: aiohttp.ClientSession, proxy: Running) -> int:
    async with client.get(proxy.url / "api/x") as resp:
        await resp.read()
        return resp.status


async def test_changed_file_is_exchanged_and_used(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A new token written to the file is exchanged, and requests go on with it."""
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    watcher = proxy.app[TOKEN_FILE_WATCHER]
    cluster.refresh_token = NEW_TOKEN  # the administrator issued a new one, the old is revoked
    write(tmp_path / "token", NEW_TOKEN + "\n")
    await until(lambda: watcher.reloads == 1)
    assert cluster.token_forms[-1]["refresh_token"] == NEW_TOKEN
    cluster.revoke_access_tokens()  # only a token from the new refresh token works now
    assert await get_ok(client, proxy) == 200
    assert cluster.token_forms[-1]["refresh_token"] == NEW_TOKEN


async def test_requests_keep_working_while_the_new_token_is_exchanged(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The old access token serves until the new one is in: no 503 window during a rotation."""
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    watcher = proxy.app[TOKEN_FILE_WATCHER]
    cluster.refresh_token = NEW_TOKEN
    cluster.token_delay = 0.3
    calls = cluster.token_calls
    write(tmp_path / "token", NEW_TOKEN)
    await until(lambda: cluster.token_calls > calls)  # the exchange is under way
    statuses = [await get_ok(client, proxy) for _ in range(5)]
    await until(lambda: watcher.reloads == 1)
    assert statuses == [200] * 5


async def test_refused_new_token_keeps_the_old_one_in_service(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A token the cluster refuses is logged; the proxy stays ready and refreshes with the old."""
    caplog.set_level(logging.INFO, logger="squirro_proxy")
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    write(tmp_path / "token", "a-token-nobody-issued-000")
    await until(lambda: "was refused" in caplog.text)
    assert "still serving with the previous one" in caplog.text
    async with client.get(proxy.url / "-/ready") as resp:
        assert resp.status == 200
    cluster.revoke_access_tokens()  # forces a refresh: it must use the old, good token
    assert await get_ok(client, proxy) == 200
    assert cluster.token_forms[-1]["refresh_token"] == REFRESH_TOKEN
    assert "a-token-nobody-issued-000" not in caplog.text


@pytest.mark.parametrize(
    ("content", "logged"),
    [
        ("", "it is empty"),
        ("\n\n", "it is empty"),
        ("two\nlines", "more than the token"),
        ("has a space", "more than the token"),
    ],
)
async def test_unusable_file_content_keeps_the_old_token(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, logged: str,
) -> None:
    """An empty or malformed file is reported once and ignored; nothing is exchanged."""
    caplog.set_level(logging.INFO, logger="squirro_proxy")
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    calls = cluster.token_calls
    write(tmp_path / "token", content)
    await until(lambda: logged in caplog.text)
    assert cluster.token_calls == calls
    assert await get_ok(client, proxy) == 200


async def test_file_missing_for_a_while_then_back(
    start_proxy: StartProxy, cluster: FakeCluster, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file that vanishes (mid-replace) is waited for; the token it comes back with is used."""
    caplog.set_level(logging.INFO, logger="squirro_proxy")
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    (tmp_path / "token").unlink()
    await until(lambda: "cannot read it" in caplog.text)
    cluster.refresh_token = NEW_TOKEN
    write(tmp_path / "token", NEW_TOKEN)
    await until(lambda: proxy.app[TOKEN_FILE_WATCHER].reloads == 1)


async def test_kubernetes_secret_symlink_swap_is_noticed(
    start_proxy: StartProxy, cluster: FakeCluster, tmp_path: Path,
) -> None:
    """A mounted Secret is updated by swapping the `..data` symlink; the watcher follows it."""
    mount = tmp_path / "secret"
    mount.mkdir()
    (mount / "..2024_01").mkdir()
    (mount / "..2024_01" / "token").write_text(REFRESH_TOKEN)
    (mount / "..data").symlink_to("..2024_01")
    (mount / "token").symlink_to("..data/token")
    proxy = await start_proxy(token_file=mount / "token", token=Secret(REFRESH_TOKEN))

    (mount / "..2024_02").mkdir()
    (mount / "..2024_02" / "token").write_text(NEW_TOKEN)
    (mount / "..data_tmp").symlink_to("..2024_02")
    (mount / "..data_tmp").replace(mount / "..data")  # atomic, as the kubelet does it
    cluster.refresh_token = NEW_TOKEN
    await until(lambda: proxy.app[TOKEN_FILE_WATCHER].reloads == 1)
    assert cluster.token_forms[-1]["refresh_token"] == NEW_TOKEN


async def test_unchanged_file_does_not_undo_a_rotation_by_the_cluster(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """When the cluster rotated the token, touching the file (same content) changes nothing."""
    cluster.rotate = True
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    rotated = cluster.refresh_token
    assert rotated != REFRESH_TOKEN
    calls = cluster.token_calls
    write(tmp_path / "token", REFRESH_TOKEN + "\n")  # same content, new inode
    watcher = proxy.app[TOKEN_FILE_WATCHER]
    await watcher.check(force=True)  # as a poll or SIGHUP would
    assert cluster.token_calls == calls and watcher.reloads == 0
    assert await get_ok(client, proxy) == 200


async def test_transient_failure_retries_the_new_token(
    start_proxy: StartProxy, cluster: FakeCluster, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If the cluster cannot be asked right now, the new token is tried again with backoff."""
    caplog.set_level(logging.INFO, logger="squirro_proxy")
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    cluster.refresh_token = NEW_TOKEN
    cluster.token_statuses = [503]
    write(tmp_path / "token", NEW_TOKEN)
    await until(lambda: "trying again" in caplog.text)
    await until(lambda: proxy.app[TOKEN_FILE_WATCHER].reloads == 1)
    assert cluster.token_forms[-1]["refresh_token"] == NEW_TOKEN


async def test_reload_now_reads_a_change_polling_cannot_see(
    start_proxy: StartProxy, cluster: FakeCluster, tmp_path: Path,
) -> None:
    """SIGHUP's reload reads the file even when size, inode and mtime are unchanged."""
    path = tmp_path / "token"
    path.write_text(REFRESH_TOKEN)
    proxy = await start_proxy()  # its own watcher would race the rewrite below
    tokens = proxy.tokens
    same_size = "x" * len(REFRESH_TOKEN)
    watcher = TokenFileWatcher(path, tokens, Secret(REFRESH_TOKEN), interval=3600)
    watcher.start()
    try:
        _rewrite_in_place(path, same_size)
        await watcher.check()  # a poll: the stamp is the same, so nothing happens
        assert watcher.reloads == 0
        cluster.refresh_token = same_size
        watcher.reload_now()
        await until(lambda: watcher.reloads == 1)
    finally:
        await watcher.stop()


def _rewrite_in_place(path: Path, text: str) -> None:
    """Same inode, same size, the old mtime restored (as `rsync -t` or a backup restore do)."""
    before = path.stat()
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)


async def test_sighup_rereads_the_token_file_in_the_cli(
    cluster: FakeCluster, cluster_url: URL, tmp_path: Path,
) -> None:
    """`kill -HUP` makes the running proxy re-read its token file (and does not end it)."""
    path = tmp_path / "token"
    path.write_text(REFRESH_TOKEN)
    async with cli_process(env={
        "SQUIRRO_CLUSTER": str(cluster_url), "SQUIRRO_TOKEN_FILE": str(path),
        "SQUIRRO_PROXY_PORT": "0",
    }, cwd=tmp_path) as proc:
        await proc.wait_line("listening on")
        new = "y" * len(REFRESH_TOKEN)
        _rewrite_in_place(path, new)  # invisible to polling: only SIGHUP finds it
        cluster.refresh_token = new
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_line("SIGHUP: re-reading the token file")
        await proc.wait_line("the new refresh token from .* is in use")
        assert cluster.token_forms[-1]["refresh_token"] == new
        proc.proc.send_signal(signal.SIGTERM)
        code, output = await proc.finish()
    assert code == 0
    assert new not in output and REFRESH_TOKEN not in output


async def test_sighup_without_a_token_file_is_harmless(
    cluster_url: URL, tmp_path: Path,
) -> None:
    """SIGHUP with the token from the environment says so and keeps serving."""
    async with cli_process(env={"SQUIRRO_CLUSTER": str(cluster_url),
                                "SQUIRRO_TOKEN": REFRESH_TOKEN, "SQUIRRO_PROXY_PORT": "0"},
                           cwd=tmp_path) as proc:
        await proc.wait_line("listening on")
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_line("SIGHUP: nothing to re-read")
        proc.proc.send_signal(signal.SIGTERM)
        code, _ = await proc.finish()
    assert code == 0


async def test_refused_new_token_while_no_token_is_valid_keeps_the_old_one(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Even when the access token has run out (a token-endpoint outage), a refused new token
    never replaces the old one: refreshing goes on with the old, and readiness comes back."""
    import time

    cluster.lifetime = 1.0
    proxy = await start_with_file(start_proxy, tmp_path / "token")
    cluster.token_down = True
    await until(lambda: not proxy.tokens.current.valid(time.monotonic()))
    cluster.token_down = False
    with pytest.raises(TokenError):
        await proxy.tokens.replace_refresh_token(Secret("a-mistyped-new-token-xxxxxxxx"))
    await until(lambda: proxy.tokens.current.valid(time.monotonic()))
    async with client.get(proxy.url / "-/ready") as resp:
        assert resp.status == 200
    assert cluster.token_forms[-1]["refresh_token"] == REFRESH_TOKEN
