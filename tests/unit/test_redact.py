"""Redactor: a table of texts in, masked texts out; the logging filter on real loggers/handlers."""

from __future__ import annotations

import logging

import pytest

from kmpops.redact import MASK, RedactingFilter, Redactor, get_redactor, install

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # 40 chars
PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBexampleexampleexampleexampleexampleexampleAAAA\n"
    "-----END OPENSSH PRIVATE KEY-----"
)

CASES = [
    # (text, must not contain, expected or None)
    ("nothing to see here", None, "nothing to see here"),
    (f"aws_secret_access_key={AWS_SECRET}", AWS_SECRET, f"aws_secret_access_key={MASK}"),
    (f'"SecretAccessKey": "{AWS_SECRET}"', AWS_SECRET, f'"SecretAccessKey": "{MASK}"'),
    (f"secret key {AWS_SECRET} used", AWS_SECRET, f"secret key {MASK} used"),
    ("key id AKIAIOSFODNN7EXAMPLE here", "IOSFODNN7EXAMPLE", f"key id AKIA{MASK} here"),
    ("temp ASIAY34FZKBOKMUTVV7A.", "Y34FZKBOKMUTVV7A", f"temp ASIA{MASK}."),
    (f"key:\n{PEM}\ndone", "b3BlbnNzaC1rZXkt", None),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAtruncated",
        "MIIEpAIBAAKCAQEA",
        f"-----BEGIN RSA PRIVATE KEY-----{MASK}-----END RSA PRIVATE KEY-----",
    ),
    (
        "postgresql://kmp:s3cr3tpw@127.0.0.1:5432/db",
        "s3cr3tpw",
        f"postgresql://kmp:{MASK}@127.0.0.1:5432/db",
    ),
    ("mailto://ops:hunter22@example.org", "hunter22", f"mailto://ops:{MASK}@example.org"),
    ("http://127.0.0.1:8080/path@v1", None, "http://127.0.0.1:8080/path@v1"),
    ("http://user@host/x", None, "http://user@host/x"),
    ("password=hunter2 next", "hunter2", f"password={MASK} next"),
    ("db_password: 'pa ss'", "pa ss", f"db_password: '{MASK}'"),
    ('{"token": "abc.def-ghi"}', "abc.def-ghi", f'{{"token": "{MASK}"}}'),
    ("url?api_key=XYZ123&x=1", "XYZ123", f"url?api_key={MASK}&x=1"),
    ("client_secret=zzzz9999;", "zzzz9999", f"client_secret={MASK};"),
    ("rotated the token for web", None, "rotated the token for web"),
    (f"password={MASK}", None, f"password={MASK}"),
]


@pytest.mark.parametrize(("text", "secret", "expected"), CASES)
def test_patterns(text: str, secret: str | None, expected: str | None) -> None:
    out = Redactor().redact(text)
    if secret is not None:
        assert secret not in out
    if expected is not None:
        assert out == expected
    assert Redactor().redact(out) == out  # idempotent


def test_known_values_longest_first_and_encoded() -> None:
    r = Redactor()
    r.add("abc")  # too short: ignored
    r.add("hunter")
    r.add("hunter2/x y")
    assert r.redact("abc hunter hunter2/x y") == f"abc {MASK} {MASK}"
    assert r.redact("q=hunter2%2Fx%20y") == f"q={MASK}"
    assert r.redact("hunter2%2Fx+y") == MASK


def test_filter_formats_then_redacts() -> None:
    r = Redactor(["sup3rsecret"])
    logger = logging.getLogger("kmpops.test.redact.filter")
    logger.propagate = False
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            self.format(record)

    handler = Capture()
    handler.addFilter(RedactingFilter(r))
    logger.addHandler(handler)
    try:
        logger.warning("login with %s and %d", "sup3rsecret", 3)
        try:
            raise RuntimeError("boom sup3rsecret")
        except RuntimeError:
            logger.exception("failed: password=%s", "pw-9999")
    finally:
        logger.removeHandler(handler)
    assert records[0].getMessage() == f"login with {MASK} and 3"
    assert records[0].args is None
    assert records[1].getMessage() == f"failed: password={MASK}"
    text = handler.format(records[1])
    assert "sup3rsecret" not in text and "RuntimeError" in text and MASK in text


def test_install_covers_propagated_records_and_is_idempotent() -> None:
    parent = logging.getLogger("kmpops.test.redact.parent")
    parent.propagate = False
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Capture()
    parent.addHandler(handler)
    try:
        get_redactor().add("ins7alled-secret")
        install(["kmpops.test.redact.parent"], record_factory=False)
        install(["kmpops.test.redact.parent"], record_factory=False)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        assert sum(isinstance(f, RedactingFilter) for f in parent.filters) == 1
        # A child logger's record only meets the parent's *handler* filters.
        logging.getLogger("kmpops.test.redact.parent.child").warning("v=%s", "ins7alled-secret")
    finally:
        parent.removeHandler(handler)
        get_redactor().clear()
    assert records == [f"v={MASK}"]


def test_record_factory_masks_records_on_any_logger() -> None:
    logger = logging.getLogger("kmpops.test.redact.factory.unfiltered")
    logger.propagate = False
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    logger.addHandler(handler)
    try:
        install([], record_factory=True)
        install([], record_factory=True)
        get_redactor().add("facto-secret")
        try:
            raise ValueError("facto-secret inside")
        except ValueError:
            logger.error("token=%s", "abc123", exc_info=True)
    finally:
        logger.removeHandler(handler)
        get_redactor().clear()
    [record] = records
    assert record.getMessage() == f"token={MASK}"
    assert record.exc_info is None and "facto-secret" not in (record.exc_text or "")
    assert "ValueError" in (record.exc_text or "")


@pytest.mark.parametrize("blob", ["QUJD" * 50_000, "a.b_c-d" * 30_000, "tokensecret" * 20_000])
def test_long_texts_stay_linear(blob: str) -> None:
    import time

    started = time.perf_counter()
    Redactor(["abcdefgh"]).redact(blob)
    assert time.perf_counter() - started < 3.0  # was minutes with unbounded prefixes


def test_kmpops_errors_never_carry_a_known_secret() -> None:
    import pickle

    from kmpops.errors import CommandFailed, ConfigError, KmpOpsError

    redactor = get_redactor()
    redactor.add("err-S3cret-0042")
    try:
        made_before = KmpOpsError("token err-S3cret-0042 refused")
        failed = CommandFailed("psql postgresql://app:err-S3cret-0042@db/app failed", None)
        config = ConfigError(["storage.secret_access_key: err-S3cret-0042 is not a reference"])
        for exc in (made_before, failed, config):
            for text in (str(exc), repr(exc), str(pickle.loads(pickle.dumps(exc)))):
                assert "err-S3cret-0042" not in text and MASK in text
        assert str(failed) == f"psql postgresql://app:{MASK}@db/app failed"
        # A secret learnt after the error was made is masked when the error is printed.
        late = KmpOpsError("late-S3cret-0043 in a message")
        redactor.add("late-S3cret-0043")
        assert str(late) == f"{MASK} in a message"
    finally:
        redactor.clear()
