"""Prefect tasks of kmp-ops (the layer between flows/ and kmpops/).

Importing this package puts :mod:`tasks.heartbeats` in place of Prefect 3.9's flow-run heartbeat
loop (same events, but it stops when the run ends instead of up to 1 s later); every flow
imports tasks before Prefect's engine starts its run.
"""

from tasks import heartbeats as _heartbeats

_heartbeats.install()
