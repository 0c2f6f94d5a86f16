"""Logging: text for people or JSON lines for pipelines, the same fields in both; one access line
per request. Every handler carries the redaction filter, so no token reaches an output."""

from __future__ import annotations

import json
import logging
import sys
import time
from time import monotonic
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .forward import (
    BYTES_IN,
    BYTES_OUT,
    FORWARDED_ID,
    HANDOVER,
    RETRIED,
    UPSTREAM_LATENCY,
)
from .headers import REQUEST_ID
from .redact import REDACTOR, mask_query

ACCESS = logging.getLogger("squirro_proxy.access")
# nginx's status for a request whose client closed the connection before it was answered.
CLIENT_CLOSED_REQUEST = 499
# Fields an access record carries, in the order the text format shows them.
ACCESS_FIELDS = ("method", "path", "status", "bytes", "bytes_in", "duration_ms", "upstream_ms",
                 "retried", "request_id")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_text or record.exc_info:
            data["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(data, default=str)


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every logger to one stream handler with the chosen format and the redactor."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(REDACTOR)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Neither format shows the caller's file and line, thread or process: don't look them up
    # for every record (the logging HOWTO's "Optimization" advice).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(logging.WARNING)  # libraries stay quiet unless something is wrong
    logging.getLogger("squirro_proxy").setLevel(level.upper())
    # aiohttp's own access log is replaced by AccessLogger below.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path (secret-looking query values masked), status, bytes,
    duration, upstream latency, whether it was retried after a 401, and the request id."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(ACCESS, log_format)

    @property
    def enabled(self) -> bool:
        return ACCESS.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        handover = request.get(HANDOVER)
        if handover is not None:  # the request began in the express lane: count from there
            time = monotonic() - handover.started
        access_line(request, response.status, request.get(BYTES_OUT, response.content_length or 0),
                time, response.headers.get(REQUEST_ID))


def log_client_gone(request: web.BaseRequest, duration: float) -> None:
    """The access line for a request whose client left before its answer ended (its handler
    was cancelled, so aiohttp logs nothing): status 499, as nginx logs it."""
    if ACCESS.isEnabledFor(logging.INFO):
        access_line(request, CLIENT_CLOSED_REQUEST, request.get(BYTES_OUT, 0), duration,
                request.get(FORWARDED_ID), " client-went-away")


def access_line(request: web.BaseRequest, status: int, size: int, duration: float,
            request_id: str | None, note: str = "") -> None:
    upstream = request.get(UPSTREAM_LATENCY)
    retried = bool(request.get(RETRIED))
    fields = {
        "method": request.method,
        "path": mask_query(request.raw_path),
        "status": status,
        "bytes": size,
        "bytes_in": request.get(BYTES_IN, 0),
        "duration_ms": round(duration * 1000, 2),
        "upstream_ms": round(upstream * 1000, 2) if upstream is not None else None,
        "retried": retried,
        "request_id": request_id,
    }
    ACCESS.info(
        "%s %s %s %sB %.1fms%s%s%s id=%s",
        fields["method"], fields["path"], fields["status"], fields["bytes"],
        fields["duration_ms"],
        f" upstream={fields['upstream_ms']}ms" if upstream is not None else "",
        " retried-after-401" if retried else "", note,
        fields["request_id"] or "-",
        extra={"event_type": "access", **fields},
    )
