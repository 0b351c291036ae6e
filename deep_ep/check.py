"""`python -m deep_ep.check`: the entry point of deep_ep.tools.check."""

import sys

from .tools.check import main

if __name__ == "__main__":
    sys.exit(main())
