"""What celld writes into an HTTP/1.1 head without h11's checks first.

The mirror's response heads and the blob client's requests are serialized by
celld itself, so their bytes go out before h11 records them (a miss's first
byte should not wait on bookkeeping). Everything written that way must match
these patterns, which are stricter than RFC 9110's grammar: whatever passes
here, h11 accepts afterwards, and a CR, LF or NUL from a server's text (a
redirect, a token, a media type) can never split a head.
"""

from __future__ import annotations

import re

TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
"""A header name."""

FIELD_VALUE = re.compile(rb"[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*")
"""A header value: visible ASCII, blanks only inside."""

TARGET = re.compile(rb"[\x21-\x7e]+")
"""A request target: visible ASCII, no blanks."""
