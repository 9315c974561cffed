"""``python -m visionpeft`` runs the command-line interface."""

from visionpeft.cli import main

raise SystemExit(main())
