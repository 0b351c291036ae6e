"""`python -m deep_ep.bench`: the entry point of deep_ep.tools.bench."""

import sys

from .tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
