"""Backup/restore benchmark: kmp-ops vs. the PostgreSQL tools and pgBackRest, same database.

Variants (each run in a fresh child process, interleaved run by run, median of --runs):
  floor           pg_dump -Fc > /dev/null
  script          pg_dump -Fc | boto3 upload_fileobj        (what an operator scripts)
  kmpops          dump_to_store, pg_dump's own gzip          (backups.database.compression: pg_dump)
  kmpops-zstd     dump_to_store(compress="zstd")             (the default: pg_dump -Z0 | zstd -3)
  kmpops-zstd-tls the same to the server's HTTPS port (boto3 checks the bench's certificate)
  kmpops-zstd-mt / -st  A/B of zstd's threading: threads=-1 with default jobs (before) / none
  pgbackrest      pgBackRest 2.45 full backup, gz, --process-max 2, same SeaweedFS over HTTPS
  pgbackrest-zst  the same with compress-type=zst
Restore:
  restore-plain       createdb + pg_restore -j 2 of the pg_dump-format dump (local file)
  restore-kmpops      PostgresDatabase.restore_from_file(jobs=2) of that file
  restore-kmpops-s3   what restore-database does with a default (zstd) backup: S3 download with
                      sha256 check, zstd -d, createdb + pg_restore -j 2
  restore-pgbackrest  pgBackRest restore (--process-max 2, --type=immediate) into a new data
                      directory + pg_ctl start until the promoted copy answers a query

pgBackRest needs a cluster with WAL archiving: the bench's own PostgreSQL gets archive_mode=on
and archive_command=pgbackrest archive-push (ALTER SYSTEM, restart) and a stanza in the bucket.
pgBackRest 2.45 speaks S3 only over TLS, so SeaweedFS also listens on HTTPS (port + 8, a
self-signed certificate; repo1-storage-verify-tls=n). Install: ./infra/install-debs.sh pgbackrest.

Database: ``pgbench -i -s SCALE`` plus a table of random bytea (incompressible) of --blob-mb.
Everything (PostgreSQL 15, SeaweedFS S3) runs on 127.0.0.1 from ports --port-base..+99.

Usage: .venv/bin/python bench/bench_backup.py [--scale 20] [--blob-mb 700] [--runs 3]
       [--variants floor,kmpops-zstd,...] [--restores none|restore-plain,...] [--out FILE.md]
Results: bench/README.md and bench/results/. The older results below are from before
zstd became the default (2026-11-27 / 12-01).

Results, 2026-11-27, `--scale 4 --blob-mb 150 --runs 3` (226 MB database; the 1 GB default
would have taken over an hour on this 2-core VM, which other engineers' benchmarks kept at load
average 9-13, so absolute times are slow and noisy; variants are interleaved run by run):

  backup (median of 3)               wall s   x floor   peak RSS MB (python / pg_dump)
  pg_dump -Fc > /dev/null              57.7     1.00        - / 23
  pg_dump | boto3 upload_fileobj       54.1     0.94       81 / 52
  kmp-ops dump_to_store                52.5     0.91       87 / 33
  kmp-ops dump_to_store(zstd)          11.9     0.21      164 / 33   (157 MB vs 172 MB object)
  download + sha256 verify of the 172 MB dump: 1.5 s
  restore (median of 3)              wall s   x plain
  createdb + pg_restore -j 2           13.8     1.00
  kmp-ops restore_from_file(jobs=2)    13.0     0.94

Results, 2026-12-01, the default ~1 GB database (`--runs 2 --port-base 23500`: 1045 MB, an
804 MB dump; load average 1-3):

  backup (median of 2)               wall s   x floor   peak RSS MB (python / pg_dump)
  pg_dump -Fc > /dev/null              47.4     1.00        - / 23
  pg_dump | boto3 upload_fileobj       50.9     1.07       81 / 52
  kmp-ops dump_to_store                49.8     1.05       93 / 32
  kmp-ops dump_to_store(zstd)          12.3     0.26      183 / 32   (731 MB object)
  download + sha256 verify of the 804 MB dump: 3.7 s
  restore (median of 2)              wall s   x plain
  createdb + pg_restore -j 2           10.6     1.00
  kmp-ops restore_from_file(jobs=2)    10.7     1.01

Goals met: backup <= 1.10x floor (0.91x: pg_dump's own gzip is the bottleneck and the upload
overlaps it), RSS < 200 MB. With incompressible data, compress="zstd" (pg_dump -Z0 + zstd) is
~5x faster than the floor itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kmpops.stack import postgres, seaweed  # noqa: E402

DB = "benchdb"


def _vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _children_maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


# ---------------------------------------------------------------- child: one variant, one run


def child(args: argparse.Namespace) -> None:
    # the configuration (it holds the S3 secret) comes on stdin, never argv (visible in ps)
    conf = json.loads(args.conf if args.conf else sys.stdin.read())
    pg_argv = [
        str(Path(conf["bin_dir"]) / "pg_dump"),
        "-Fc",
        "-h",
        conf["host"],
        "-p",
        str(conf["port"]),
        "-U",
        conf["user"],
        DB,
    ]
    key = f"bench/{args.child}.dump"
    started = time.monotonic()
    size = 0
    if args.child == "floor":
        with open(os.devnull, "wb") as devnull:
            subprocess.run(pg_argv, stdout=devnull, check=True)
    elif args.child == "script":
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=conf["endpoint_url"],
            aws_access_key_id=conf["access_key_id"],
            aws_secret_access_key=conf["secret_access_key"],
            region_name="us-east-1",
        )
        proc = subprocess.Popen(pg_argv, stdout=subprocess.PIPE)
        client.upload_fileobj(proc.stdout, conf["bucket"], key)
        if proc.wait() != 0:
            raise SystemExit("pg_dump failed")
        size = client.head_object(Bucket=conf["bucket"], Key=key)["ContentLength"]
    elif args.child in ("pgbackrest", "pgbackrest-zst"):
        from bench.pgbackrest_peer import PgBackRest

        peer = PgBackRest(**conf["pgbackrest"])
        peer.write_conf("zst" if args.child == "pgbackrest-zst" else "gz")
        peer.backup()
        size = peer.repo_size()
    elif args.child == "restore-pgbackrest":
        from bench.pgbackrest_peer import PgBackRest

        peer = PgBackRest(**conf["pgbackrest"])
        peer.write_conf(conf["compress_type"])
        restored, _ready = peer.restore(Path(conf["restore_dir"]), conf["restore_port"])
        size = int(restored * 1000)  # ms of the restore command alone (the wall is until ready)
    elif args.child == "restore-kmpops-s3":
        # what restore-database's task does: download with sha256 check, then restore_from_file
        from kmpops.connectors.database import PostgresDatabase
        from kmpops.connectors.storage import S3Store

        db = PostgresDatabase(
            host=conf["host"],
            port=conf["port"],
            user=conf["user"],
            dbname=DB,
            bin_dir=Path(conf["bin_dir"]),
        )
        with (
            S3Store(
                bucket=conf["bucket"],
                endpoint_url=conf["endpoint_url"],
                access_key_id=conf["access_key_id"],
                secret_access_key=conf["secret_access_key"],
            ) as store,
            tempfile.TemporaryDirectory(dir=conf["scratch"]) as tmp,
        ):
            local = Path(tmp) / "backup.dump"
            info = store.head(conf["key"])
            assert info is not None and info.sha256
            store.download(conf["key"], local, expected_sha256=info.sha256)
            db.restore_from_file(local, conf["target"], jobs=2, compression=conf["compression"])
    elif args.child in (
        "kmpops",
        "kmpops-zstd",
        "kmpops-zstd-tls",
        "kmpops-zstd-mt",
        "kmpops-zstd-st",
    ):
        from kmpops.connectors.database import PostgresDatabase
        from kmpops.connectors.storage import S3Store

        if args.child in ("kmpops-zstd-mt", "kmpops-zstd-st"):  # A/B of zstd's threading
            import zstandard

            real = zstandard.ZstdCompressor
            threads = -1 if args.child == "kmpops-zstd-mt" else 0
            zstandard.ZstdCompressor = lambda **_: real(level=3, threads=threads)  # type: ignore[misc]

        db = PostgresDatabase(
            host=conf["host"],
            port=conf["port"],
            user=conf["user"],
            dbname=DB,
            bin_dir=Path(conf["bin_dir"]),
        )
        tls = args.child.endswith("-tls")
        with S3Store(
            bucket=conf["bucket"],
            endpoint_url=conf["https_endpoint_url" if tls else "endpoint_url"],
            access_key_id=conf["access_key_id"],
            secret_access_key=conf["secret_access_key"],
        ) as store:
            compress = "zstd" if args.child.startswith("kmpops-zstd") else "none"
            size = db.dump_to_store(store, key, compress=compress).size
    elif args.child == "restore-plain":
        target = conf["target"]
        b = Path(conf["bin_dir"])
        common = ["-h", conf["host"], "-p", str(conf["port"]), "-U", conf["user"]]
        subprocess.run([str(b / "createdb"), *common, target], check=True)
        subprocess.run(
            [str(b / "pg_restore"), *common, "-j", "2", "-d", target, conf["dump_file"]], check=True
        )
    elif args.child == "restore-kmpops":
        from kmpops.connectors.database import PostgresDatabase

        db = PostgresDatabase(
            host=conf["host"],
            port=conf["port"],
            user=conf["user"],
            dbname=DB,
            bin_dir=Path(conf["bin_dir"]),
        )
        db.restore_from_file(Path(conf["dump_file"]), conf["target"], jobs=2)
    wall = time.monotonic() - started
    print(
        json.dumps(
            {
                "wall": wall,
                "size": size,
                "self_rss_mb": _vmhwm_kb() / 1024,
                "children_rss_mb": _children_maxrss_kb() / 1024,
            }
        )
    )


def run_child(variant: str, conf: dict) -> dict:
    # boto3 verifies the bench's self-signed certificate through AWS_CA_BUNDLE (the -tls variant)
    env = {**os.environ, "AWS_CA_BUNDLE": conf.get("ca_bundle", "")}
    if not env["AWS_CA_BUNDLE"]:
        del env["AWS_CA_BUNDLE"]
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant],
        input=json.dumps(conf),
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    """The 1/5/15-minute load averages, as /proc/loadavg has them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


LABELS = {
    "floor": "pg_dump -Fc > /dev/null",
    "script": "pg_dump \\| boto3 upload_fileobj",
    "kmpops": "kmp-ops dump_to_store(pg_dump gzip)",
    "kmpops-zstd": "kmp-ops dump_to_store(zstd)",
    "kmpops-zstd-tls": "kmp-ops dump_to_store(zstd), HTTPS",
    "kmpops-zstd-mt": "kmp-ops zstd, threads=-1, default jobs (before)",
    "kmpops-zstd-st": "kmp-ops zstd, single-threaded",
    "pgbackrest": "pgBackRest full, gz, HTTPS",
    "pgbackrest-zst": "pgBackRest full, zst, HTTPS",
    "restore-plain": "createdb + pg_restore -j 2 (local file)",
    "restore-kmpops": "kmp-ops restore_from_file (local file)",
    "restore-kmpops-s3": "kmp-ops S3 download+verify+restore",
    "restore-pgbackrest": "pgBackRest restore + start, ready",
}


# ---------------------------------------------------------------- parent


def build_database(info: postgres.PGInfo, scale: int, blob_mb: int) -> None:
    import psycopg

    common = ["-h", info.host, "-p", str(info.port), "-U", info.user]
    with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    subprocess.run(
        [str(info.bin_dir / "pgbench"), *common, "-i", "-q", "-s", str(scale), DB],
        check=True,
        capture_output=True,
    )
    row = 8192
    rows = blob_mb * 1024 * 1024 // row
    with psycopg.connect(info.dsn(DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE blobs (id int PRIMARY KEY, data bytea)")
        conn.execute("ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL")
        with conn.cursor() as cur, cur.copy("COPY blobs (id, data) FROM STDIN") as copy:
            for i in range(rows):
                copy.write_row((i, os.urandom(row)))
        conn.execute("VACUUM ANALYZE")
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    print(
        f"database {DB}: pgbench scale {scale} + {blob_mb} MB random bytea = {size / 2**20:.0f} MB"
    )


def drop(info: postgres.PGInfo, name: str) -> None:
    import psycopg

    with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def enable_archiving(root: Path, pg: postgres.PGInfo, peer: object, port: int) -> postgres.PGInfo:
    """archive_mode on with pgBackRest's archive-push (ALTER SYSTEM), then restart the cluster."""
    import psycopg
    import psycopg.sql

    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET archive_mode = on")
        command = psycopg.sql.Literal(peer.archive_command())  # type: ignore[attr-defined]
        conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET archive_command = {}").format(command))
        conn.execute("ALTER SYSTEM SET max_wal_senders = 3")
    postgres.stop(root)
    return postgres.start(root, port)


def summarize(results: dict[str, list[dict]], base: str, title: str) -> list[str]:
    """Markdown rows: median wall, x ``base``, peak RSS python / children, size."""
    ref = statistics.median(r["wall"] for r in results[base])
    lines = [
        f"| {title} | wall (median of {len(results[base])}) | x {LABELS[base]} "
        "| peak RSS MB python / children | size MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        self_rss = max(r["self_rss_mb"] for r in runs)
        kids = max(r["children_rss_mb"] for r in runs)
        size = runs[-1]["size"] / 2**20 if not variant.startswith("restore") else 0
        lines.append(
            f"| {LABELS[variant]} | {wall:.2f} s | {wall / ref:.2f} | {self_rss:.0f} / {kids:.0f} "
            f"| {size:.0f} |"
            if size
            else f"| {LABELS[variant]} | {wall:.2f} s | {wall / ref:.2f} "
            f"| {self_rss:.0f} / {kids:.0f} | |"
        )
    return lines


BACKUP_VARIANTS = (
    "floor",
    "script",
    "kmpops",
    "kmpops-zstd",
    "kmpops-zstd-tls",
    "kmpops-zstd-mt",
    "kmpops-zstd-st",
    "pgbackrest",
    "pgbackrest-zst",
)
RESTORE_VARIANTS = ("restore-plain", "restore-kmpops", "restore-kmpops-s3", "restore-pgbackrest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--blob-mb", type=int, default=700)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port-base", type=int, default=33500)
    parser.add_argument(
        "--variants",
        default=",".join(BACKUP_VARIANTS),
        help=f"comma-separated backup variants (of {', '.join(BACKUP_VARIANTS)})",
    )
    parser.add_argument(
        "--restores",
        default=",".join(RESTORE_VARIANTS),
        help="comma-separated restore variants, or 'none'",
    )
    parser.add_argument("--root", help="parent directory of the bench's files (default /tmp)")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stack directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--conf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    restores = [] if args.restores == "none" else [v for v in args.restores.split(",") if v]
    for v in variants + restores:
        if v not in LABELS or (v in BACKUP_VARIANTS) == (v in restores):
            raise SystemExit(f"unknown variant {v!r}")
    want_pgbr = any("pgbackrest" in v for v in variants + restores)
    if want_pgbr and not shutil.which("pgbackrest"):
        raise SystemExit("pgbackrest is not installed: ./infra/install-debs.sh pgbackrest")

    root = Path(tempfile.mkdtemp(prefix="kmpops-bench-", dir=args.root))
    os.chmod(root, 0o755)  # the postgres system user must traverse it
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    try:
        t0 = time.monotonic()
        # ports above 32767 can be held in TIME_WAIT by other programs: take a free block
        s3_port = next(
            p
            for p in range(args.port_base, args.port_base + 50, 10)
            if not seaweed.ports_bindable(p, count=9)
        )
        cert, key = (None, None)
        if want_pgbr or "kmpops-zstd-tls" in variants:
            from bench.pgbackrest_peer import self_signed_cert

            cert, key = self_signed_cert(root / "tls")
        s3 = seaweed.start(root, s3_port, tls=(cert, key) if cert and key else None)
        t_s3 = time.monotonic() - t0
        t0 = time.monotonic()
        pg_port = args.port_base + 50
        pg = postgres.start(root, pg_port)
        t_pg = time.monotonic() - t0
        print(f"stack: SeaweedFS S3 up in {t_s3:.1f}s, PostgreSQL 15 up in {t_pg:.1f}s")
        build_database(pg, args.scale, args.blob_mb)
        import psycopg

        with psycopg.connect(pg.dsn(DB)) as conn:
            db_size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        conf = {
            "host": pg.host,
            "port": pg.port,
            "user": pg.user,
            "bin_dir": str(pg.bin_dir),
            "endpoint_url": s3.endpoint_url,
            "https_endpoint_url": s3.https_endpoint_url,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
            "bucket": s3.bucket,
            "ca_bundle": str(cert) if cert else "",
        }
        if want_pgbr:
            from bench.pgbackrest_peer import PgBackRest

            peer_fields = {
                "home": str(root / "pgbackrest"),
                "data_dir": str(pg.data_dir),
                "socket_dir": str(pg.data_dir.parent / "run"),
                "port": pg.port,
                "bin_dir": str(pg.bin_dir),
                "s3_port": s3_port + 8,
                "bucket": s3.bucket,
                "access_key_id": s3.access_key_id,
                "secret_access_key": s3.secret_access_key,
                "process_max": 2,
            }
            peer = PgBackRest(**peer_fields)  # type: ignore[arg-type]
            peer.write_conf()
            pg = enable_archiving(root, pg, peer, pg_port)
            peer.setup()
            conf["pgbackrest"] = peer_fields
            with psycopg.connect(pg.dsn("postgres")) as conn:
                cluster = conn.execute(
                    "SELECT sum(pg_database_size(datname)) FROM pg_database"
                ).fetchone()[0]
        else:
            cluster = db_size
        say(
            f"database {DB}: pgbench scale {args.scale} + {args.blob_mb} MB random bytea = "
            f"{db_size / 2**20:.0f} MB (cluster {cluster / 2**20:.0f} MB); "
            f"load average before: {load_average()}"
        )
        backup: dict[str, list[dict]] = {v: [] for v in variants}
        loads = [load_average()]
        for _ in range(args.runs):
            for variant in backup:  # interleaved so load drift hits all variants alike
                backup[variant].append(run_child(variant, conf))
                last = backup[variant][-1]
                print(
                    f"  {variant}: {last['wall']:.2f}s, peak RSS {last['self_rss_mb']:.0f} MB "
                    f"(children {last['children_rss_mb']:.0f} MB), load {load_average()}",
                    flush=True,
                )
            loads.append(load_average())
        say()
        say(f"backup; load average (1/5/15 min) after each round: {' | '.join(loads)}")
        say()
        for line in summarize(backup, variants[0], "backup"):
            say(line)
        if "kmpops-zstd" in backup and "pgbackrest" in backup:
            kz = statistics.median(r["wall"] for r in backup["kmpops-zstd"])
            for peer_v in ("pgbackrest", "pgbackrest-zst"):
                if peer_v in backup:
                    pb = statistics.median(r["wall"] for r in backup[peer_v])
                    say(f"\nkmp-ops (zstd, default) / {LABELS[peer_v]}: {kz / pb:.2f}")
            if "kmpops-zstd-tls" in backup:
                kt = statistics.median(r["wall"] for r in backup["kmpops-zstd-tls"])
                pb = statistics.median(r["wall"] for r in backup["pgbackrest"])
                say(f"kmp-ops (zstd, HTTPS) / pgBackRest (gz, HTTPS): {kt / pb:.2f}")

        if not restores:
            return
        from kmpops.connectors.storage import S3Store

        source = "bench/kmpops.dump"
        dump_file = root / "bench.dump"
        with S3Store(
            bucket=s3.bucket,
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
        ) as store:
            if store.head(source) is None:  # no pg_dump-format backup this run: make one
                run_child("kmpops", conf)
            t0 = time.monotonic()
            store.download(source, dump_file)
            t_dl = time.monotonic() - t0
        say(f"\ndownload + sha256 verify of the pg_dump-format dump: {t_dl:.1f}s")
        zkey = "bench/kmpops-zstd.dump"
        restore: dict[str, list[dict]] = {v: [] for v in restores}
        loads = [load_average()]
        for i in range(args.runs):
            for variant in restore:
                target = f"restored_{variant.split('-')[1]}_{i}"
                drop(pg, target)
                extra: dict = {"dump_file": str(dump_file), "target": target}
                if variant == "restore-kmpops-s3":
                    extra |= {"key": zkey, "compression": "zstd", "scratch": str(root)}
                    if zkey not in {o.key for o in _listing(s3, "bench/")}:
                        run_child("kmpops-zstd", conf)
                if variant == "restore-pgbackrest":
                    extra |= {
                        "restore_dir": str(root / "pgbr-restore" / "data"),
                        "restore_port": args.port_base + 60,
                        "compress_type": "zst" if "pgbackrest-zst" in backup else "gz",
                    }
                    (root / "pgbr-restore").mkdir(exist_ok=True)
                restore[variant].append(run_child(variant, {**conf, **extra}))
                print(f"  {variant}: {restore[variant][-1]['wall']:.2f}s", flush=True)
                drop(pg, target)
            loads.append(load_average())
        say()
        say(f"restore; load average after each round: {' | '.join(loads)}")
        say()
        for line in summarize(restore, restores[0], "restore"):
            say(line)
        if "restore-pgbackrest" in restore:
            pb = statistics.median(r["wall"] for r in restore["restore-pgbackrest"])
            cmd = statistics.median(r["size"] / 1000 for r in restore["restore-pgbackrest"])
            say(f"\npgBackRest restore command alone (median): {cmd:.2f} s")
            for v in ("restore-kmpops-s3", "restore-kmpops"):
                if v in restore:
                    kw = statistics.median(r["wall"] for r in restore[v])
                    say(f"{LABELS[v]} / pgBackRest restore until ready: {kw / pb:.2f}")
        print("\nraw:", json.dumps({"backup": backup, "restore": restore}))
    finally:
        if args.out and out:
            Path(args.out).write_text("\n".join(out) + "\n")
        postgres.stop(root)
        seaweed.stop(root)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _listing(s3: seaweed.S3Info, prefix: str) -> list:
    from kmpops.connectors.storage import S3Store

    with S3Store(
        bucket=s3.bucket,
        endpoint_url=s3.endpoint_url,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    ) as store:
        return store.list(prefix)


if __name__ == "__main__":
    main()
