"""/-/status in a real browser: headless Debian chromium renders it, and a screenshot shows the
state at a glance (green header when ready, red when not). CI installs chromium; a missing
browser fails these tests rather than skipping them."""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Running, StartProxy
from tests.fakes import REFRESH_TOKEN, FakeCluster
from tests.helpers import chromium, until

WINDOW = (1280, 1000)
GREEN = (0x17, 0x80, 0x3D)  # --ok in status.html
RED = (0xC0, 0x26, 0x2D)  # --bad
# Where the last screenshots are kept for a person to look at (gitignored build output).
KEEP = Path(__file__).resolve().parent.parent / "build" / "screenshots"

pytestmark = pytest.mark.browser


async def screenshot(tmp_path: Path, url: URL, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    await chromium(tmp_path, url, f"--screenshot={path}",
                   f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars")
    assert path.stat().st_size > 10_000, "an empty page compresses to almost nothing"
    KEEP.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, KEEP / path.name)
    return path


def png_rows(path: Path, rows: int) -> tuple[int, list[bytes]]:
    """The width and the first `rows` pixel rows (RGB or RGBA, 8 bits) of a PNG, unfiltered."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, _, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 3 if color == 2 else 4
    raw = zlib.decompressobj().decompress(idat, (width * bpp + 1) * rows)
    stride = width * bpp
    out: list[bytes] = []
    previous = bytearray(stride)
    for y in range(rows):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                up_left = previous[i - bpp] if i >= bpp else 0
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc
                                      else up_left)) & 0xFF
        out.append(bytes(line))
        previous = line
    return width, out


def pixel(width: int, rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    bpp = len(rows[0]) // width
    r, g, b = rows[y][x * bpp:x * bpp + 3]
    return r, g, b


async def traffic(client: aiohttp.ClientSession, proxy: Running) -> None:
    for path in ("api/topic/v0/squirro_test/projects", "api/a", "status/404", "status/502"):
        async with client.get(proxy.url / path) as resp:
            await resp.read()


async def test_ready_page_is_green_and_readable(
    proxy: Running, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A ready proxy's page has a green header band; a person sees 'Ready' at a glance."""
    await traffic(client, proxy)
    shot = await screenshot(tmp_path, proxy.url / "-/status", "status-ready")
    width, rows = png_rows(shot, 40)
    assert width == WINDOW[0]
    assert pixel(width, rows, 5, 20) == GREEN
    assert pixel(width, rows, WINDOW[0] // 2, 35) == GREEN


async def test_not_ready_page_is_red_and_says_why(
    start_proxy: StartProxy, cluster: FakeCluster, tmp_path: Path
) -> None:
    """A proxy whose refresh token was refused shows a red header and the reason."""
    cluster.refresh_token = "a-different-token-entirely"  # ours is refused: 404, final
    proxy = await start_proxy(wait_token=False)
    await until(lambda: proxy.tokens.failure is not None)
    shot = await screenshot(tmp_path, proxy.url / "-/status", "status-not-ready")
    width, rows = png_rows(shot, 40)
    assert pixel(width, rows, 5, 20) == RED
    dom = await chromium(tmp_path, proxy.url / "-/status", "--dump-dom")
    assert "Not ready" in dom and "the cluster refused the refresh token" in dom
    assert "rejected as invalid (404)" in dom  # the detail, for the person at the browser
    assert REFRESH_TOKEN not in dom


async def test_page_script_runs_under_its_own_csp(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The countdown script is allowed by the page's Content-Security-Policy and runs; the
    rendered page names cluster, tenant, user and role, and never a token."""
    await traffic(client, proxy)
    dom = await chromium(tmp_path, proxy.url / "-/status", "--dump-dom",
                         "--virtual-time-budget=2500")
    assert re.search(r'<body class="live">', dom), "the script did not run"
    for text in (str(proxy.settings.cluster), "squirro_test", "user-1234", "admin",
                 "/status/502", "startup"):
        assert text in dom
    for secret in (REFRESH_TOKEN, *cluster.tokens):
        assert secret not in dom
