"""``python -m scope_stream`` is the ``scope-stream`` command."""

from scope_stream.cli import main

main()
