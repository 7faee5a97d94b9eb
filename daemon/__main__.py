"""``python -m daemon``: the same as the ``kmesh-daemon`` console script."""

from daemon.main import run

run()
