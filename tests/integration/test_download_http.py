"""fetch_corpus and the `download` stage against a real HTTP server on 127.0.0.1.

Every failure is run twice (see `assert_fails`): into an empty directory, which must stay
empty, and over a previous good output, which must stay byte-for-byte (and mtime) untouched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from http_server import ScriptedServer, endless_chunks, ok, slow, status, truncated

from factories import build_zip, download_cfg
from nmt.config import DownloadConfig
from nmt.data.download import (
    USER_AGENT,
    ArchiveError,
    ChecksumError,
    DownloadError,
    HTTPStatusError,
    NetworkError,
    TooLargeError,
    fetch_corpus,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "data" / "external" / "fra-eng.zip"
CORPUS = b"Go.\tVa !\nHi.\tSalut !\n" * 50


PAYLOAD = build_zip(
    {
        "fra-eng/fra.txt": CORPUS,
        "fra-eng/_about.txt": random.Random(0).randbytes(20_000),  # incompressible: 20 kB zip
        "__MACOSX/fra-eng/._fra.txt": b"\0" * 212,
    }
)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
OLD = build_zip({"fra-eng/fra.txt": b"Old.\tVieux.\n"})  # the "previous good output"


def cfg(url: str, **overrides: object) -> DownloadConfig:
    """The payload's checksum, a missing bundled copy, 2 retries and a 2 MB cap."""
    values: dict[str, object] = dict(
        sha256=PAYLOAD_SHA256, bundled="data/external/does-not-exist.zip",
        connect_timeout_s=1.0, read_timeout_s=2.0, retries=2, backoff_s=0.01,
        max_download_bytes=2_000_000)
    return download_cfg(url, **(values | overrides))


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


def listing(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


def assert_fails(config: DownloadConfig, tmp_path: Path, error: type[Exception]) -> str:
    """Fetch into an empty dir and over a good previous output; both fail and leave no trace."""
    fresh = tmp_path / "fresh" / "fra-eng.zip"
    with pytest.raises(error) as info:
        fetch_corpus(config, fresh, REPO_ROOT)
    assert os.listdir(fresh.parent) == [], "a failed fetch left files behind"
    kept = tmp_path / "kept" / "fra-eng.zip"
    kept.parent.mkdir()
    kept.write_bytes(OLD)
    kept.with_name("fra-eng.zip.sha256").write_text("old  fra-eng.zip\n")
    before = listing(kept.parent)
    with pytest.raises(error):
        fetch_corpus(config, kept, REPO_ROOT)
    assert listing(kept.parent) == before, "a failed fetch touched the previous output"
    return str(info.value)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_good_download(server: ScriptedServer, tmp_path: Path, chunked: bool) -> None:
    url = server.route("/fra-eng.zip", ok(PAYLOAD, chunked=chunked))
    out = tmp_path / "raw" / "fra-eng.zip"
    out.parent.mkdir()
    out.write_bytes(OLD)
    result = fetch_corpus(cfg(url), out, REPO_ROOT)
    assert (result.path, result.sha256, result.source, result.bytes) == (
        out,
        PAYLOAD_SHA256,
        "url",
        len(PAYLOAD),
    )
    assert out.read_bytes() == PAYLOAD
    assert out.with_name("fra-eng.zip.sha256").read_text() == f"{PAYLOAD_SHA256}  fra-eng.zip\n"
    assert sorted(os.listdir(out.parent)) == ["fra-eng.zip", "fra-eng.zip.sha256"]
    [(_, headers)] = server.requests
    assert headers["User-Agent"] == USER_AGENT
    assert headers["User-Agent"].startswith("Mozilla/5.0")


def test_mismatched_bundled_copy_falls_back_to_url(server: ScriptedServer, tmp_path: Path) -> None:
    bundled = tmp_path / "bundled.zip"
    bundled.write_bytes(OLD)  # a valid archive, but not the pinned one
    url = server.route("/fra-eng.zip", ok(PAYLOAD))
    out = tmp_path / "raw" / "fra-eng.zip"
    result = fetch_corpus(cfg(url, bundled=str(bundled)), out, REPO_ROOT)
    assert (result.source, server.hits("/fra-eng.zip")) == ("url", 1)
    assert out.read_bytes() == PAYLOAD


def test_empty_sha256_accepts_newest_and_records_it(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", ok(PAYLOAD))
    config = cfg(url, sha256="", bundled=str(SNAPSHOT))  # bundled exists but cannot be trusted
    out = tmp_path / "fra-eng.zip"
    result = fetch_corpus(config, out, REPO_ROOT)
    assert (result.source, result.sha256) == ("url", PAYLOAD_SHA256)
    assert out.with_name("fra-eng.zip.sha256").read_text().split() == [
        PAYLOAD_SHA256,
        "fra-eng.zip",
    ]


@pytest.mark.parametrize("code", [404, 403])
def test_client_error_is_not_retried(server: ScriptedServer, tmp_path: Path, code: int) -> None:
    url = server.route("/fra-eng.zip", status(code))
    message = assert_fails(cfg(url, retries=3), tmp_path, HTTPStatusError)
    assert str(code) in message and url in message and "download.url" in message
    assert server.hits("/fra-eng.zip") == 2  # one request per fetch: no retries


def test_server_error_is_retried(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", status(500), status(503), ok(PAYLOAD))
    result = fetch_corpus(cfg(url, retries=2), tmp_path / "fra-eng.zip", REPO_ROOT)
    assert (result.sha256, server.hits("/fra-eng.zip")) == (PAYLOAD_SHA256, 3)


def test_server_error_gives_up_after_retries(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", status(500))
    message = assert_fails(cfg(url, retries=1), tmp_path, NetworkError)
    assert "HTTP 500" in message and "after 2 attempts" in message
    assert server.hits("/fra-eng.zip") == 4


def test_connection_dropped_mid_body(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", truncated(PAYLOAD[:500], declared=len(PAYLOAD)))
    message = assert_fails(cfg(url, retries=1), tmp_path, NetworkError)
    assert url in message and "after 2 attempts" in message
    assert server.hits("/fra-eng.zip") == 4


def test_dropped_then_good_is_retried(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", truncated(PAYLOAD[:500], len(PAYLOAD)), ok(PAYLOAD))
    result = fetch_corpus(cfg(url), tmp_path / "fra-eng.zip", REPO_ROOT)
    assert (result.sha256, server.hits("/fra-eng.zip")) == (PAYLOAD_SHA256, 2)


def test_unreachable_server(tmp_path: Path) -> None:
    with ScriptedServer() as gone:
        url = gone.url("/fra-eng.zip")
    message = assert_fails(cfg(url, retries=1), tmp_path, NetworkError)
    assert "connection to" in message and url in message


@pytest.mark.parametrize("after_bytes", [0, 500], ids=["before-headers", "mid-body"])
def test_slow_server_times_out(server: ScriptedServer, tmp_path: Path, after_bytes: int) -> None:
    url = server.route("/fra-eng.zip", slow(PAYLOAD, delay_s=2.0, after_bytes=after_bytes))
    message = assert_fails(cfg(url, read_timeout_s=0.2, retries=1), tmp_path, NetworkError)
    assert "timed out" in message and "read 0.2 s" in message


def test_checksum_mismatch_names_both_hashes(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", ok(PAYLOAD))
    message = assert_fails(cfg(url, sha256="ab" * 32), tmp_path, ChecksumError)
    assert "ab" * 32 in message and PAYLOAD_SHA256 in message
    assert 'set it to ""' in message and "download.sha256" in message
    assert server.hits("/fra-eng.zip") == 2  # not retried


def test_declared_length_too_large(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", ok(PAYLOAD))
    message = assert_fails(cfg(url, max_download_bytes=1000), tmp_path, TooLargeError)
    assert str(len(PAYLOAD)) in message and "max_download_bytes=1000" in message
    assert server.hits("/fra-eng.zip") == 2  # not retried


def test_chunked_body_growing_too_large(server: ScriptedServer, tmp_path: Path) -> None:
    url = server.route("/fra-eng.zip", endless_chunks(b"z" * 8192))
    message = assert_fails(cfg(url, max_download_bytes=100_000), tmp_path, TooLargeError)
    assert "sent more than download.max_download_bytes=100000" in message


MALICIOUS = {
    "zip_slip_parent": build_zip({"../evil.txt": b"x", "fra-eng/fra.txt": CORPUS}),
    "zip_slip_absolute": build_zip({"/abs.txt": b"x", "fra-eng/fra.txt": CORPUS}),
    "bomb_ratio": build_zip({"fra-eng/fra.txt": b"\0" * 900_000}),
    "bomb_total": build_zip({"fra-eng/fra.txt": CORPUS, "x.bin": os.urandom(1_000_001)}),
    "missing_member": build_zip({"fra-eng/_about.txt": b"about"}),
    "macosx_only": build_zip({"__MACOSX/fra-eng/._fra.txt": b"\0" * 212}),
    "not_a_zip": b"<html>Please enable JavaScript</html>",
}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_bad_archive_is_never_renamed_into_place(
    server: ScriptedServer, tmp_path: Path, name: str
) -> None:
    url = server.route("/fra-eng.zip", ok(MALICIOUS[name]))
    message = assert_fails(cfg(url, sha256=""), tmp_path, ArchiveError)
    assert f"archive from {url} refused" in message


def load_stage() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "download_stage", REPO_ROOT / "pipelines" / "download.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_uses_bundled_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "data" / "raw" / "fra-eng.zip"
    assert load_stage().main(["--params", str(REPO_ROOT / "params.yaml"), "--out", str(out)]) == 0
    assert out.read_bytes() == SNAPSHOT.read_bytes()


def test_stage_returns_1_on_download_error(
    server: ScriptedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.route("/gone.zip", status(404))
    profile = tmp_path / "profile.yaml"
    profile.write_text(f'download:\n  url: {url}\n  sha256: ""\n  retries: 0\n')
    out = tmp_path / "fra-eng.zip"
    argv = ["--params", str(REPO_ROOT / "params.yaml"), "--profile", str(profile)]
    assert load_stage().main([*argv, "--out", str(out)]) == 1
    assert not out.exists() and os.listdir(tmp_path) == ["profile.yaml"]
    assert "HTTP 404" in caplog.text
    assert issubclass(HTTPStatusError, DownloadError)
