"""Run the Alertmanager webhook receiver: firing alerts become ``kmpops.alert.firing`` events.

    KMPOPS_ALERTMANAGER_TOKEN_FILE=/etc/kmpops/am-token \\
    python deployments/alertmanager_receiver.py --host 127.0.0.1 --port 17600

(from the repository root, with ``PREFECT_API_URL`` pointing at the Prefect server). Point an
Alertmanager ``webhook_configs`` receiver at ``http://HOST:PORT/alertmanager``. Firing alerts
whose ``severity`` label is ``critical`` (or that carry ``incident="true"``) are emitted as
``kmpops.alert.firing``, the event the incident-response deployment trigger starts on; other
alerts and resolutions are only logged. The token (a bearer token Alertmanager sends) is read
from a file, never from the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmpops.alertmanager import AlertmanagerReceiver, AlertNotice

log = logging.getLogger("kmpops.alertmanager")


def opens_incident(notice: AlertNotice) -> bool:
    """Firing, and critical or explicitly marked ``incident="true"``."""
    if notice.status != "firing":
        return False
    flag = notice.labels.get("incident")
    return flag == "true" if flag in ("true", "false") else notice.severity == "critical"


def emit_firing(notices: list[AlertNotice]) -> None:
    """The receiver's callback: emit one Prefect event per alert that opens an incident."""
    from tasks.alerting import emit_alert_firing

    for notice in notices:
        if opens_incident(notice):
            event_id = emit_alert_firing(notice.payload())
            log.info("alert %s firing: event %s", notice.rule, event_id)
        else:
            log.info("alert %s %s (%s): no incident", notice.rule, notice.status, notice.severity)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=17600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token_file = os.environ.get("KMPOPS_ALERTMANAGER_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else None
    receiver = AlertmanagerReceiver(emit_firing, host=args.host, port=args.port, token=token)
    log.info("alertmanager receiver on %s", receiver.url)
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
