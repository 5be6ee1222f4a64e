"""Front ends that manage a running machine from outside: the QMP server (`qmp.py`) and its commands."""
