"""`python -m hpcserve ...` is the `hpcserve` command."""

from hpcserve.cli import app

app(prog_name="hpcserve")
