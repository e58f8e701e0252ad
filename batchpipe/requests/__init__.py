"""Rows into Message Batch requests: templates, the custom_id scheme, and batch packing.

- ``render``: row checks and the templates (jinja2's one home): a row gives the Messages
  params or a :class:`RowProblem`, so pre-flight validation reports every bad row first
- ``ids``: the custom_id scheme (``{token}-{row_index}-{attempt}``), known only there
- ``packing``: serialized requests into create bodies under the API's limits
- ``framing``: the create body's byte layout the size checks and the packer share
"""

from batchpipe.requests.ids import (
    format_custom_id,
    new_job_token,
    own_id_reader,
    parse_custom_id,
)
from batchpipe.requests.packing import BatchPacker, PlannedBatch
from batchpipe.requests.render import (
    IdKinds,
    MixedIds,
    NestedId,
    RequestRenderer,
    RowProblem,
    RowSource,
    check_result_column_clash,
    check_row_key,
    chunk_keys,
    id_kind,
    standin_key,
)

__all__ = [
    "BatchPacker",
    "IdKinds",
    "MixedIds",
    "NestedId",
    "PlannedBatch",
    "RequestRenderer",
    "RowProblem",
    "RowSource",
    "check_result_column_clash",
    "check_row_key",
    "chunk_keys",
    "format_custom_id",
    "id_kind",
    "new_job_token",
    "own_id_reader",
    "parse_custom_id",
    "standin_key",
]
