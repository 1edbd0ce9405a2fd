"""The test lakes: a local dir or a fresh prefix of the suite's S3 bucket, read through the lake's own
storage layer (``LakeSettings.delta_options``, ``consumers.table.table_filesystem``), never ``os.walk``."""

from __future__ import annotations

from deltalake import DeltaTable
from pyarrow import fs

from consumers.table import table_filesystem
from core.settings import LakeSettings


def lake_env(lake: LakeSettings) -> dict[str, str]:
    """``FLYWHEEL_LAKE_*`` that point a subprocess at ``lake``."""
    secret = lake.s3_secret_access_key
    s3 = {
        "FLYWHEEL_LAKE_S3_ENDPOINT": lake.s3_endpoint,
        "FLYWHEEL_LAKE_S3_ACCESS_KEY_ID": lake.s3_access_key_id,
        "FLYWHEEL_LAKE_S3_SECRET_ACCESS_KEY": secret.get_secret_value() if secret else None,
    }
    return {"FLYWHEEL_LAKE_ROOT": lake.root} | {k: v for k, v in s3.items() if v is not None}


def open_table(lake: LakeSettings, version: int | None = None) -> DeltaTable:
    return DeltaTable(lake.traces_uri, version=version, storage_options=lake.delta_options())


def objects(lake: LakeSettings, under: str = "") -> dict[str, int]:
    """Every object under the table root, or its folder ``under`` (path relative to the root -> bytes);
    empty before the table exists."""
    selector = fs.FileSelector(under, recursive=True, allow_not_found=True)
    infos = table_filesystem(lake).get_file_info(selector)
    return {i.path.strip("/"): i.size for i in infos if i.type == fs.FileType.File}


def commits(lake: LakeSettings) -> int:
    """Commit files in the table's ``_delta_log`` (one listing of that folder only: tests poll this)."""
    return sum(1 for p in objects(lake, "_delta_log") if p.endswith(".json"))
