"""A local emulator of Anthropic's Message Batches API, for tests, demos and ``--emulate``.

The official SDK talks to it unchanged, either over real HTTP::

    with EmulatorServer(Emulator(EmulatorConfig(seed=1))) as srv:
        client = anthropic.Anthropic(api_key="any", base_url=srv.url)

or in-process, without sockets::

    emu = Emulator()
    client = anthropic.Anthropic(api_key="any", base_url=IN_PROCESS_BASE_URL,
                                 http_client=emu.http_client())

Batches live in memory on a controllable clock (``advance``); faults are injected by seeded
knobs (``EmulatorConfig``); ``save``/``load`` carry the state between processes. Control
endpoints under ``/_emulator/``: GET ``stats``, GET/POST ``faults``, POST ``clock``
(``{"advance": seconds}``), POST ``reset``.

Results of a batch whose archive time (29 days after ``created_at``) has passed are answered
with 404 ``not_found_error`` whose message says they were archived; the batch itself stays
retrievable, with ``archived_at`` set. Nothing on batchpipe's production path imports this.
"""

from batchpipe.emulator.core import IN_PROCESS_BASE_URL, Emulator
from batchpipe.emulator.faults import ResultsStreamBroken
from batchpipe.emulator.server import EmulatorServer
from batchpipe.emulator.settings import EmulatorConfig

__all__ = [
    "IN_PROCESS_BASE_URL",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "ResultsStreamBroken",
]
