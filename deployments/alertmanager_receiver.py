"""Run the Alertmanager webhook receiver: firing alerts become ``kmpops.alert.firing`` events.

    KMPOPS_ALERTMANAGER_TOKEN_FILE=/etc/kmpops/am-token \\
    python deployments/alertmanager_receiver.py --host 127.0.0.1 --port 17600

(from the repository root, with ``PREFECT_API_URL`` pointing at the Prefect server). Point an
Alertmanager ``webhook_configs`` receiver at ``http://HOST:PORT/alertmanager``. Firing alerts
whose ``severity`` label is ``critical`` (or that carry ``incident="true"``) are emitted as
``kmpops.alert.firing``, the event the incident-response deployment trigger starts on; other
alerts and resolutions are only logged. The token (a bearer token Alertmanager sends) is read
from a file, never from the command line.

It refuses to start (exit 2, nothing bound) without a token, unless ``--insecure-local`` is
given *and* it binds to a loopback address — for development only; it then warns loudly that it
accepts alerts from anyone on this machine. Every connection has a socket timeout
(``--request-timeout``, 10 s), bodies are limited to 1 MiB and 32 levels of nesting.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmpops.alertmanager import REQUEST_TIMEOUT_S, AlertmanagerReceiver, AlertNotice, is_loopback

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


def read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The bearer token from ``KMPOPS_ALERTMANAGER_TOKEN_FILE``; None only with
    ``--insecure-local`` on a loopback address. Anything else ends the process (exit 2) with a
    message naming what is missing."""
    token_file = os.environ.get("KMPOPS_ALERTMANAGER_TOKEN_FILE")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            parser.error(f"cannot read the token file {token_file}: {exc.strerror}")
        if not token:
            parser.error(f"the token file {token_file} is empty")
        return token
    if not args.insecure_local:
        parser.error(
            "no token: set KMPOPS_ALERTMANAGER_TOKEN_FILE to a file holding the bearer token "
            "Alertmanager sends (http_config.authorization.credentials_file), or run with "
            "--insecure-local on 127.0.0.1 for development"
        )
    if not is_loopback(args.host):
        parser.error(f"--insecure-local only on a loopback address, not {args.host}")
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=17600)
    parser.add_argument(
        "--insecure-local",
        action="store_true",
        help="development only: accept alerts without a token (loopback addresses only)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=REQUEST_TIMEOUT_S,
        help="seconds a connection may stay silent before it is closed",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = read_token(parser, args)
    if token is None:
        log.warning(
            "WARNING: --insecure-local: this receiver accepts alerts WITHOUT AUTHENTICATION "
            "from anyone on this machine; never run it like this in production"
        )
    receiver = AlertmanagerReceiver(
        emit_firing,
        host=args.host,
        port=args.port,
        token=token,
        request_timeout=args.request_timeout,
    )
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
