"""The real loopback server at the API's size limit: a 256 MB create is accepted, more is 413.

Slow-marked (about 1 GB of memory and several seconds): one request body of each size.
"""

from __future__ import annotations

import anthropic
import pytest

from batchpipe.emulator import EmulatorServer

LIMIT = 256 * 1024 * 1024
pytestmark = pytest.mark.slow


def body_of(requests: int, total_bytes: int) -> list[dict[str, object]]:
    """``requests`` requests whose JSON body is a little under ``total_bytes``."""
    text = "x" * (total_bytes // requests - 200)
    return [
        {
            "custom_id": f"big-{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": text}],
            },
        }
        for i in range(requests)
    ]


def test_loopback_accepts_a_256_mb_create_and_refuses_more(
    emulator_server: EmulatorServer, anthropic_client: anthropic.Anthropic
) -> None:
    requests = body_of(1000, LIMIT)
    batch = anthropic_client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.request_counts.processing == 1000
    del requests
    emulator_server.emulator.advance(3)
    assert anthropic_client.messages.batches.retrieve(batch.id).request_counts.succeeded == 1000

    too_big = [body_of(1, LIMIT + 1024 * 1024)[0] | {"custom_id": "too-big"}]
    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        anthropic_client.messages.batches.create(requests=too_big)  # type: ignore[arg-type]
    assert caught.value.response.json()["error"]["type"] == "request_too_large"
    # The connection stays usable: the server drained the refused body before answering.
    assert len(anthropic_client.messages.batches.list().data) == 1
