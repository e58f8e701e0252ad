"""Commands that only work on existing jobs refuse to create a state database.

Opening a SQLite URL creates the file (and migrates it), which is right for `run`, `submit`,
`tick` and `db upgrade`. For `status`, `jobs`, `report`, `export`, `cancel`, `retry` and
`resume` there can be no job in a database that does not exist yet: creating one there
(a typo in --db, the wrong working directory) would leave an empty `batchpipe.db` behind
and answer "no jobs yet", hiding the mistake.
"""

from __future__ import annotations

from batchpipe.cli.app import State
from batchpipe.cli.wiring import settings_for
from batchpipe.db import sqlite_path
from batchpipe.errors import UsageError


def require_database(state: State) -> None:
    """Raise UsageError (exit 2) when the state database is a SQLite file that does not exist.

    A file in a missing folder is left to ``Store.open``, which names the folder. Server
    databases (PostgreSQL) are never created by batchpipe, so they need no check here.
    """
    url = settings_for(state).database_url
    path = sqlite_path(url)
    if path is None or path.exists() or not path.parent.is_dir():
        return
    raise UsageError(
        f"no database at {path.absolute()}; run `batchpipe run` (or `batchpipe submit`) "
        "first, or point --db (BATCHPIPE_DATABASE_URL) at the database your jobs are in"
    )
