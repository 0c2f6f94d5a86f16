"""A last line of defence: scrub known secrets from anything the proxy logs.

The code never logs a token on purpose; this filter makes sure a token that slips into a message
(an exception text from a library, say) is masked anyway. Each secret the proxy learns (refresh
token, access tokens, client token) is registered here.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

MASK = "********"
# Query parameters whose values look like credentials; masked in access-log paths.
SECRET_PARAM = re.compile(
    r"(?i)([?&](?:[^=&]*(?:token|secret|password|passwd|pwd|api[_-]?key|apikey|auth|authorization|bearer|"
    r"signature|sig|session|credential|key))=)[^&]*"
)


class Redactor(logging.Filter):
    """Replaces every registered secret in a record's final message."""

    # Access tokens pass (one every few minutes, worthless once expired); refresh and client
    # tokens last, so they are kept apart and never pushed out by the passing ones.
    MAX_PASSING = 64
    MAX_LASTING = 32

    def __init__(self) -> None:
        super().__init__()
        self._lasting: OrderedDict[str, None] = OrderedDict()
        self._passing: OrderedDict[str, None] = OrderedDict()

    def add(self, secret: str, *, lasting: bool = False) -> None:
        """Register a secret; `lasting` for refresh and client tokens, which must never drop
        out, however many access tokens come after them."""
        if len(secret) < 6:
            return  # masking a 3-letter word everywhere would hurt more than help
        store, limit = (
            (self._lasting, self.MAX_LASTING) if lasting else (self._passing, self.MAX_PASSING)
        )
        store[secret] = None
        store.move_to_end(secret)
        while len(store) > limit:
            store.popitem(last=False)

    def lasting_secrets(self) -> tuple[str, ...]:
        """The refresh and client tokens, for a worker process's own redactor."""
        return tuple(self._lasting)

    def scrub(self, text: str) -> str:
        for store in (self._lasting, self._passing):
            for secret in store:
                if secret in text:
                    text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self.scrub(message)
        if scrubbed is not message and scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks are rendered later by the formatter; render and scrub them now.
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def mask_query(path_qs: str) -> str:
    """Mask the values of query parameters that look like secrets (for access logs)."""
    if "?" not in path_qs:
        return path_qs
    return SECRET_PARAM.sub(lambda m: m.group(1) + MASK, path_qs)


REDACTOR = Redactor()
