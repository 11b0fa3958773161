"""The stages: each maps files on disk to files on disk (import, demo data, mine, score,
evaluate, re-rank, gallery, demo, report). They use ``teacher`` and ``student`` and the floors
below; ``cli.py`` calls them, nothing below imports them."""
