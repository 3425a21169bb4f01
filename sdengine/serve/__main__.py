"""`python -m sdengine.serve [--model PATH] ...`: the same arguments as `sdengine serve`."""

import sys

from .cli import main

sys.exit(main())
