"""The byte layout of a create body, shared by the size checks and the packer.

A create body is ``b'{"requests":[' + b",".join(requests) + b"]}"``; each request is
``{"custom_id":…,"params":…}``.
"""

from __future__ import annotations

BODY_HEAD = b'{"requests":['
BODY_TAIL = b"]}"
FRAME_BYTES = len(BODY_HEAD) + len(BODY_TAIL)
# The longest custom_id the API allows.
MAX_CUSTOM_ID = 64
# request_bytes() around the custom_id and the params.
WRAPPER_BYTES = len(b'{"custom_id":"","params":}')
# A request's bytes around its params, with the longest custom_id.
REQUEST_WRAPPER_BYTES = WRAPPER_BYTES + MAX_CUSTOM_ID
