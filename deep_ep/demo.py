"""`python -m deep_ep.demo`: the entry point of deep_ep.tools.demo."""

import sys

from .tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
