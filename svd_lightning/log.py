"""The one-line messages svd-lightning prints on stderr (choices made, paths written or read).

Kept free of torch and Lightning so that reading a run (:mod:`svd_lightning.run`) imports neither.
"""

from __future__ import annotations

import os
import sys


class InputError(ValueError):
    """Bad input from a user (a file, a run, a setting): the message names where and what fixes it.

    The command line prints these as one line instead of a traceback.
    """


def _rank() -> int:
    # Lightning's own rank once it has set one (its strategies set rank_zero_only.rank), else the launcher's.
    module = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(module, "rank_zero_only", None), "rank", None)
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0) if rank is None else int(rank)


def say(message: str) -> None:
    """One ``svd-lightning: …`` line on stderr (global rank zero only)."""
    if _rank() == 0:
        print(f"svd-lightning: {message}", file=sys.stderr, flush=True)
