"""The proxy's memory while large streams pass: measured on a real `python -m proxy` process."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks.measure import PeakRss
from tests.benchmarks.streaming import RSS_TARGET, MiB, Stack, download, upload

SIZE = 256 * MiB


def test_rss_stays_bounded_while_hundreds_of_mib_pass_each_way(tmp_path: Path) -> None:
    """256 MiB down (length and chunked) and up (chunked and length) pass byte-exact through a
    proxy process whose resident memory stays less than 64 MiB above its idle size."""
    with Stack(tmp_path, nginx=False) as stack:
        proxy = stack.proxy
        assert proxy.proc is not None
        with PeakRss(proxy.proc.pid) as rss:  # the baseline is the idle proxy, token in hand
            transfers = [
                download(proxy, SIZE, None),
                download(proxy, SIZE, None, length=False),
                upload(proxy, SIZE, None, chunked=True),
                upload(proxy, SIZE, None, chunked=False),
            ]
    print(f"proxy RSS idle {rss.before / MiB:.1f} MiB, peak +{rss.growth / MiB:.1f} MiB; "
          + ", ".join(f"{t.what} {t.mib_s:.0f} MiB/s" for t in transfers))
    assert [t.what for t in transfers if not t.ok] == []  # every transfer byte-exact
    assert rss.growth < RSS_TARGET
