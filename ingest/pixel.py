"""The 1x1 transparent GIF and the headers that keep it uncached and unindexed."""

from __future__ import annotations

import base64

# The classic 43-byte transparent GIF89a.
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")

# no-store: every open must reach us, so no browser, proxy or CDN may keep a copy.
PIXEL_HEADERS = {
    "Content-Type": "image/gif",
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
    "X-Robots-Tag": "noindex, nofollow",
}
