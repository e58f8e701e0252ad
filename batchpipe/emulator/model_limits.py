"""Each model's context window and output limit, as the emulated API enforces them.

The table lives in the core layer (:mod:`batchpipe.model_limits`), where the pipeline's
pre-flight check reads it too, so the emulator and that check cannot disagree.
"""

from batchpipe.model_limits import DEFAULT_LIMITS, MODEL_LIMITS, ModelLimits, limits_for

__all__ = ["DEFAULT_LIMITS", "MODEL_LIMITS", "ModelLimits", "limits_for"]
