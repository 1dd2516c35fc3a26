"""Shared set-up for the backup flow tests: a private ops.yaml, bucket, database and config dir.

Each test gets its own records store, S3 bucket, PostgreSQL database and configuration directory
on the stack's hosts, so the backup tests never see each other's (or other suites') objects.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psycopg
import yaml
from botocore.config import Config

TABLES = {
    "customers": 2000,
    "orders": 3500,
    "order_lines": 1800,
}


@dataclass
class BackupEnv:
    root: Path
    ops_yaml: Path
    bucket: str
    dbname: str
    pg_port: int
    s3: Any
    notifications: Path
    config_dirs: dict[str, Path] = field(default_factory=dict)
    stack: Any = None

    def pg(self, dbname: str | None = None, **kw: Any) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=self.pg_port, user="postgres", dbname=dbname or self.dbname, **kw
        )

    def counts(self, dbname: str) -> dict[str, int]:
        with self.pg(dbname) as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}

    def token(self, approver: str) -> str:
        """The local approver's token (the stack writes one per approver)."""
        path = Path(self.stack.root) / "secrets" / f"approver-{approver}.token"
        return path.read_text().strip()

    def object_bytes(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        out = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))

    def records(self):
        from kmpops.config import parse_config
        from kmpops.records import Records

        cfg = yaml.safe_load(self.ops_yaml.read_text())
        rec = Records.from_config(parse_config(cfg))
        rec.migrate()
        return rec


def s3_client(endpoint: str, root: Path):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=(root / "secrets" / "s3_access_key").read_text().strip(),
        aws_secret_access_key=(root / "secrets" / "s3_secret_key").read_text().strip(),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def seed_database(env: BackupEnv, big_rows: int = 0) -> None:
    with env.pg("postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{env.dbname}"')
    with env.pg() as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers(id),"
            " amount numeric(10,2) NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE order_lines (id int PRIMARY KEY, order_id int REFERENCES orders(id),"
            " sku text, qty int)"
        )
        conn.execute(
            "INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, %s) g",
            (TABLES["customers"],),
        )
        conn.execute(
            "INSERT INTO orders SELECT g, 1 + g %% %s, (g %% 997) / 10.0"
            " FROM generate_series(1, %s) g",
            (TABLES["customers"], TABLES["orders"]),
        )
        conn.execute(
            "INSERT INTO order_lines SELECT g, 1 + g %% %s, 'sku-' || (g %% 50), g %% 7"
            " FROM generate_series(1, %s) g",
            (TABLES["orders"], TABLES["order_lines"]),
        )
        if big_rows:
            # incompressible payload so the dump is big enough to interrupt mid-upload
            conn.execute("CREATE TABLE blobs (id int PRIMARY KEY, payload bytea)")
            conn.execute(
                "INSERT INTO blobs SELECT g, (SELECT decode(string_agg("
                "md5(random()::text || g || i), ''), 'hex') FROM generate_series(1, 2048) i)"
                " FROM generate_series(1, %s) g",
                (big_rows,),
            )


def make_env(
    stack: Any, tmp_path: Path, *, s3_endpoint: str | None = None, s3_root: Path | None = None
) -> BackupEnv:
    stack_root = Path(stack.root)
    base = yaml.safe_load(Path(stack.ops_yaml).read_text())
    uid = uuid.uuid4().hex[:8]
    bucket = f"bk-{uid}"
    endpoint = s3_endpoint or stack.s3["endpoint_url"]
    s3 = s3_client(endpoint, s3_root or stack_root)
    s3.create_bucket(Bucket=bucket)
    notifications = tmp_path / "notifications.jsonl"
    sink = f"jsonl://{notifications}"
    pg_port = stack.port_base + 200
    base["records"] = {
        "url": f"sqlite:///{tmp_path / 'records.db'}",
        "audit_key": base["records"]["audit_key"],
    }
    base["notifications"]["routes"] = {"critical": [sink], "warning": [sink], "info": [sink]}
    base["storage"]["bucket"] = bucket
    base["storage"]["endpoint_url"] = endpoint
    if s3_root is not None:
        base["storage"]["access_key_id"] = f"file:{s3_root / 'secrets' / 's3_access_key'}"
        base["storage"]["secret_access_key"] = f"file:{s3_root / 'secrets' / 's3_secret_key'}"
    dbname = f"bk_{uid}"
    base["databases"] = {
        "shop": {
            "kind": "postgresql",
            "host": "127.0.0.1",
            "port": pg_port,
            "user": "postgres",
            "dbname": dbname,
            "sanity_queries": [
                "SELECT count(*) > 0 FROM customers",
                "SELECT NOT EXISTS (SELECT 1 FROM orders o LEFT JOIN customers c"
                " ON c.id = o.customer_id WHERE c.id IS NULL)",
            ],
            "rpo": "25h",
            "rto": "10m",
        }
    }
    # Configuration files owned by other users (the tests' 65534) are backed up and restored
    # with their owners, which needs root on the host: this environment logs in as root, as a
    # configuration-management login would, instead of the stack's deploy user.
    for environment in base["environments"].values():
        environment["become"] = False
        for host in environment["hosts"]:
            host["user"] = "root"
    config_rel = f"etc/bk-{uid}"
    base["services"]["web"]["config_paths"] = ["{root}/" + config_rel]
    ops_yaml = tmp_path / "ops.yaml"
    ops_yaml.write_text(yaml.safe_dump(base, sort_keys=False))
    env = BackupEnv(
        root=tmp_path,
        ops_yaml=ops_yaml,
        bucket=bucket,
        dbname=dbname,
        pg_port=pg_port,
        s3=s3,
        notifications=notifications,
        stack=stack,
    )
    for host in stack.hosts:
        env.config_dirs[host.name] = Path(host.root) / config_rel
    return env


def drop_env(env: BackupEnv) -> None:
    with env.pg("postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (env.dbname + "%",)
        ).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(path).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o7777)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def api_url() -> str:
    return os.environ["PREFECT_API_URL"]


def latest_artifact(key: str) -> dict[str, Any]:
    """The newest artifact with ``key`` from the Prefect API."""
    import httpx

    found = httpx.post(
        f"{api_url()}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
        timeout=10,
    ).json()
    assert found, f"no artifact {key!r}"
    return found[0]
