"""Entry point: ``python -m benchmarks [--quick | --tiny] [--only NAME,...] [--out DIR]``."""

from __future__ import annotations

import sys
import warnings

from benchmarks.runner import main

if __name__ == "__main__":
    # langchain_community announces its sunset on import; keep the report readable.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.exit(main())
