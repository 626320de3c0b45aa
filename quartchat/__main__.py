"""``python -m quartchat`` is the ``quartchat`` command."""

from .cli import main

raise SystemExit(main())
