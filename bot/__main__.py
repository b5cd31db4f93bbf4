"""`python -m bot` is the `idefics-bot` command."""

import sys

from bot.runtime.cli import main

sys.exit(main())
