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
    r"(?i)([?&](?:[^=&]*(?:token|secret|password|passwd|pwd|api[_-]?key|apikey|auth|"
    r"signature|sig|session|credential|key))=)[^&]*"
)


class Redactor(logging.Filter):
    """Replaces every registered secret in a record's final message."""

    MAX_SECRETS = 64  # access tokens rotate; old ones stop mattering after a while

    def __init__(self) -> None:
        super().__init__()
        self._secrets: OrderedDict[str, None] = OrderedDict()

    def add(self, secret: str) -> None:
        if len(secret) < 6:
            return  # masking a 3-letter word everywhere would hurt more than help
        self._secrets[secret] = None
        self._secrets.move_to_end(secret)
        while len(self._secrets) > self.MAX_SECRETS:
            self._secrets.popitem(last=False)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
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
