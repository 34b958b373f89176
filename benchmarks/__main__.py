"""Entry point: ``python -m benchmarks``, options ``--quick | --tiny``, ``--runs N``,
``--only NAME,...``, ``--out DIR``.

See ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys
import warnings

from benchmarks.runner import main

if __name__ == "__main__":
    # langchain_community announces its sunset on import; keep the report readable.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.exit(main())
