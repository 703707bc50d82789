"""``python -m vmvault`` runs the vmvault CLI."""

import sys

from vmvault.scheduler.cli import main

sys.exit(main())
