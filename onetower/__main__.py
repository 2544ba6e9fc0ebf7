from onetower.cli import app

app()
