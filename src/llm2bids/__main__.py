"""``python -m llm2bids``: the same command line as the ``llm2bids`` script."""

import sys

from llm2bids.cli.main import main

sys.exit(main())
