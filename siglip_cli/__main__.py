"""`python -m siglip_cli ...`: the `siglip` command without its console script (a checkout on PYTHONPATH)."""

from .cli import app

app(prog_name="siglip")
