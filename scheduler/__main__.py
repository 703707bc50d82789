"""``python -m scheduler`` runs the vmvault CLI."""

import sys

from scheduler.cli import main

sys.exit(main())
