"""batchpipe's state database: schema, migrations and the Store.

SQLAlchemy and alembic are imported only inside this package. Modules:

- ``schema``: the tables (SQLAlchemy Core)
- ``rows``: the records the Store returns (results come in as ``models.ResultRecord``)
- ``connect``: engines per dialect, masked URLs
- ``migrate``: alembic upgrade/downgrade/revisions, driven from code
- ``store``: :class:`Store`, built from ``jobs``, ``items`` and ``batches``
- ``duplicates``: the duplicate-key query, :class:`AscendingKeys` (when it is not needed)
  and :class:`ScratchKeys` for rows not stored
"""

from batchpipe.db.base import JobNameTaken
from batchpipe.db.connect import mask_url, sqlite_path
from batchpipe.db.duplicates import AscendingKeys, ScratchKeys
from batchpipe.db.migrate import current_revision, downgrade, head_revision, upgrade
from batchpipe.db.rows import BatchRow, ItemRow, JobRow, PendingItem
from batchpipe.db.store import Store

__all__ = [
    "AscendingKeys",
    "BatchRow",
    "ItemRow",
    "JobNameTaken",
    "JobRow",
    "PendingItem",
    "ScratchKeys",
    "Store",
    "current_revision",
    "downgrade",
    "head_revision",
    "mask_url",
    "sqlite_path",
    "upgrade",
]
