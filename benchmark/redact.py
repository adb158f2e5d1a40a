"""Passwords never leave the process: a URL's password (postgresql://user:PASS@host, an MLflow server's
http://user:PASS@host) or a password/token query value is written as *** wherever tumorbench writes
text (saved configs, MLflow params and tags, printed lines, error messages). The value itself is
still used, in memory, to connect; better still, it comes from the environment (PGPASSWORD or
~/.pgpass, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and is never in a URL at all."""
from __future__ import annotations

import re
import sys

MASK = "***"
# scheme://user:password@ : the password is everything up to the '@' (a literal '@', '/' or space in
# a password must be percent-encoded in a URL, so none can stand inside one).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"]*):([^\s@/?#'\"]+)@")
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|pwd|token|access_token|secret|api_key)=)[^&\s'\"#]+",
                           re.IGNORECASE)


def mask(text: str) -> str:
    """`text` with every URL password and secret query value replaced by ***."""
    text = _URL_PASSWORD.sub(lambda found: f"{found[1]}:{MASK}@", text)
    return _QUERY_SECRET.sub(lambda found: found[1] + MASK, text)


class MaskedStream:
    """A text stream that masks what is written through it (anything else goes to the stream it wraps):
    tracebacks, warnings and library messages included, not only tumorbench's own lines."""

    def __init__(self, stream):
        self.wrapped = stream

    def write(self, text: str) -> int:
        self.wrapped.write(mask(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def mask_output() -> None:
    """Mask this process's sys.stdout and sys.stderr from now on (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskedStream):
            setattr(sys, name, MaskedStream(stream))
