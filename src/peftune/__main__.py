"""``python -m peftune`` (and ``accelerate launch -m peftune``) runs the CLI."""

from peftune.cli import main

raise SystemExit(main())
