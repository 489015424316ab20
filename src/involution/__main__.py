"""``python -m involution`` runs the command line."""

import sys

from involution.cli.__main__ import main

sys.exit(main())
