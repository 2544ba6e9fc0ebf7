"""``python -m onetower``: the same app as the ``onetower`` command."""

from onetower.cli import app

app()
