"""``python -m fnllm.cli``: the ``fnllm`` command."""

import sys

from fnllm.cli import main

sys.exit(main())
