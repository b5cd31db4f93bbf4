"""`python -m bot` is the `idefics-bot` command."""

import sys

from bot.runtime.cli import main

if __name__ == "__main__":  # also imported by a process the prompt process starts (multiprocessing)
    sys.exit(main())
