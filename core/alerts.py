"""Failure notifications: what a failed flywheel task sends besides its own log (off unless configured).

The DAGs' ``on_failure_callback`` (dags/flywheel_assets.py) builds a small summary of the failure and
calls :func:`notify`: with ``FLYWHEEL_ALERT_WEBHOOK_URL`` set it is POSTed there as JSON (a Slack or Teams
incoming webhook, Alertmanager's webhook receiver, any HTTP endpoint); unset, nothing leaves the process. A
notification that fails is logged and swallowed: the task has failed already, the alert must not hide why.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from core.settings import AlertSettings

log = logging.getLogger("flywheel.alerts")


def notify(alert: AlertSettings, summary: dict[str, Any]) -> bool:
    """POST ``summary`` (plus a one-line ``text`` for chat webhooks) to the webhook; True if it answered 2xx."""
    if not alert.webhook_url:
        return False
    text = f"flywheel: {summary.get('dag_id')}.{summary.get('task_id')} failed: {summary.get('exception')}"
    try:
        response = httpx.post(
            alert.webhook_url, json={"text": text} | summary, timeout=alert.webhook_timeout_s
        )
        response.raise_for_status()
    except httpx.HTTPError as e:
        log.warning("failure notification to %s failed: %s", httpx.URL(alert.webhook_url).host, e)
        return False
    return True
