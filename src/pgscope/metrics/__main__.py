"""``python -m pgscope.metrics > docs/metrics.md``: print the registry as Markdown.

(A package with this ``__main__`` rather than a ``metrics.py`` module: ``pgscope`` imports
the registry at start-up, and ``python -m`` on a module already imported warns.)"""

from pgscope.metrics import main

main()
