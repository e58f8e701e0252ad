"""The only user of the anthropic SDK (see ``api``); ``lines`` parses the results file.

Importing this package imports the SDK (~2 s of CPU): commands that never call the API
import it lazily.
"""

from batchpipe.client.api import NO_KEY_MESSAGE, BatchClient

__all__ = ["NO_KEY_MESSAGE", "BatchClient"]
