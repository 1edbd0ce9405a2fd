"""Kafka ACLs of an authenticated stack: what each principal may do on the project's topics.

With ``FLYWHEEL_STACK_AUTH=true`` the broker denies whatever no ACL allows (``StandardAuthorizer``,
``allow.everyone.if.no.acl.found=false``); ``admin`` is a super user. `flywheel topics create` creates these
bindings next to the topics they guard, from the same topic names (``FLYWHEEL_KAFKA_*_TOPIC``):

| principal | allowed                                                                    | why                                   |
|-----------|----------------------------------------------------------------------------|---------------------------------------|
| serving   | WRITE traces; READ promotions; READ groups ``flywheel-swap-*``             | capture; hot-swaps follow promotions  |
| ingest    | READ traces; READ groups ``flywheel-ingest*``; WRITE the DLQ               | the exactly-once sink and dead letters |
|           | READ the DLQ; READ groups ``flywheel-dlq-reader-*``                        | `flywheel dlq inspect`/`replay` (lake) |
|           | WRITE window announcements                                                 | what schedules drafter_flywheel       |
| trainer   | WRITE promotions                                                           | promote, rollback, speculation on/off |
|           | READ window announcements; READ groups ``flywheel-airflow-*``              | Airflow's triggerer (AssetWatcher)    |

READ and WRITE imply DESCRIBE (metadata of the topic). Readers that only assign partitions (the promotion
listener, the DLQ reader) commit nothing, but a consumer with a group id still looks up its coordinator. An idempotent producer needs no IDEMPOTENT_WRITE
on the cluster (KIP-679): WRITE on a topic is enough, as tests/integration/test_auth.py shows. Nobody but ``admin`` creates,
deletes or reconfigures topics, and ``serving`` cannot read the traces it writes (the prompts of others).
"""

from __future__ import annotations

import time

from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from core.settings import KafkaSettings

SWAP_GROUP_PREFIX = "flywheel-swap-"  # + node, pid, nonce: every serving node reads the whole topic
INGEST_GROUP_PREFIX = "flywheel-ingest"  # the ingest's consumer group, and variants of it
DLQ_READER_GROUP_PREFIX = "flywheel-dlq-reader-"  # + nonce: each inspect/replay reads the whole DLQ
AIRFLOW_GROUP_PREFIX = "flywheel-airflow-"  # the triggerer's consumer of window announcements

_TOPIC, _GROUP = ResourceType.TOPIC, ResourceType.GROUP
_LITERAL, _PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
_READ, _WRITE = AclOperation.READ, AclOperation.WRITE


def project_acls(kafka: KafkaSettings) -> list[AclBinding]:
    """Every ALLOW binding of the table above, for these topic names."""
    grants = {
        "serving": [
            (_TOPIC, kafka.traces_topic, _LITERAL, _WRITE),
            (_TOPIC, kafka.promotions_topic, _LITERAL, _READ),
            (_GROUP, SWAP_GROUP_PREFIX, _PREFIXED, _READ),
        ],
        "ingest": [
            (_TOPIC, kafka.traces_topic, _LITERAL, _READ),
            (_GROUP, INGEST_GROUP_PREFIX, _PREFIXED, _READ),
            (_TOPIC, kafka.dlq_topic, _LITERAL, _WRITE),
            (_TOPIC, kafka.dlq_topic, _LITERAL, _READ),
            (_GROUP, DLQ_READER_GROUP_PREFIX, _PREFIXED, _READ),
            (_TOPIC, kafka.windows_topic, _LITERAL, _WRITE),
        ],
        "trainer": [
            (_TOPIC, kafka.promotions_topic, _LITERAL, _WRITE),
            (_TOPIC, kafka.windows_topic, _LITERAL, _READ),
            (_GROUP, AIRFLOW_GROUP_PREFIX, _PREFIXED, _READ),
        ],
    }
    return [
        AclBinding(kind, name, pattern, f"User:{principal}", "*", operation, AclPermissionType.ALLOW)
        for principal, rules in grants.items()
        for kind, name, pattern, operation in rules
    ]


def ensure_acls(admin: AdminClient, kafka: KafkaSettings, timeout_s: float = 30.0) -> list[AclBinding]:
    """Create the bindings (a binding that exists is left as it is). Returns them once the broker lists them:
    the controller commits them first and the broker applies them a moment later, and a client started
    right after must not be refused meanwhile."""
    bindings = project_acls(kafka)
    for fut in admin.create_acls(bindings, request_timeout=timeout_s).values():
        fut.result()
    deadline = time.monotonic() + timeout_s
    while not set(map(str, bindings)) <= set(map(str, listed_acls(admin, timeout_s))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"created ACLs are not in the broker's view after {timeout_s}s")
        time.sleep(0.1)
    return bindings


def listed_acls(admin: AdminClient, timeout_s: float = 30.0) -> list[AclBinding]:
    """Every binding the broker enforces now."""
    match_all = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ANY
    )
    return admin.describe_acls(match_all, request_timeout=timeout_s).result()
