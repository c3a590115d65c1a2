"""The remote toolkit: one shell script (``ops.sh``), one parser and one group handle for
every target reached through a shell (``docker exec``, SSH). See ``wire.py`` and
``group.py``."""
