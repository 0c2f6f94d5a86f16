"""The log safety net: secret-looking query values masked, registered secrets scrubbed."""

from __future__ import annotations

import io
import logging

import pytest

from proxy.redact import MASK, Redactor, mask_query


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/x", "/api/x"),
        ("/api/x?count=10&q=term", "/api/x?count=10&q=term"),
        ("/api/x?token=abc&count=1", f"/api/x?token={MASK}&count=1"),
        ("/api/x?a=1&access_token=abc", f"/api/x?a=1&access_token={MASK}"),
        ("/api/x?refresh_token=abc", f"/api/x?refresh_token={MASK}"),
        ("/api/x?API_KEY=abc&password=p&sig=s",
         f"/api/x?API_KEY={MASK}&password={MASK}&sig={MASK}"),
        ("/api/x?client_secret=abc", f"/api/x?client_secret={MASK}"),
        ("/api/x?session=zzz", f"/api/x?session={MASK}"),
    ],
)
def test_mask_query_table(path: str, expected: str) -> None:
    """Values of credential-like query keys are masked in what the access log shows."""
    assert mask_query(path) == expected


def test_registered_secret_scrubbed_from_message_args_and_traceback() -> None:
    """A registered secret is masked wherever it lands: message, arguments, exception text."""
    redactor = Redactor()
    secret = "s3cr3t-value-that-must-not-leak"
    redactor.add(secret)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(redactor)
    logger = logging.getLogger("test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("token is %s", secret)
        try:
            raise ValueError(f"bad {secret}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert secret not in out
    assert out.count(MASK) == 2
    assert "ValueError" in out


def test_short_strings_are_not_registered() -> None:
    """Tiny values are not treated as secrets (masking 'a' everywhere would wreck logs)."""
    redactor = Redactor()
    redactor.add("abc")
    assert redactor.scrub("abc def") == "abc def"


def test_lasting_secrets_survive_many_passing_ones() -> None:
    """Refresh and client tokens stay masked however many access tokens came after them."""
    redactor = Redactor()
    redactor.add("refresh-token-that-lasts", lasting=True)
    for n in range(500):
        redactor.add(f"access-token-{n:06d}")
    assert redactor.scrub("oops refresh-token-that-lasts") == f"oops {MASK}"
    assert redactor.scrub("access-token-000499") == MASK
