"""Unit tests for nmt.data.download: archive checks, the bundled (offline) path, small helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import free_port
from factories import build_zip, download_cfg
from nmt.config import DownloadConfig, load_params
from nmt.data.download import (
    ArchiveError,
    FetchResult,
    _read_limited,
    check_archive,
    fetch_corpus,
    read_corpus_member,
    sha256_file,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "data" / "external" / "fra-eng.zip"
SNAPSHOT_SHA256 = "161c93f18da3a7e6df611ed961426613260de8af06ccf8c79c977afe5135ac44"
CORPUS = b"Go.\tVa !\nHi.\tSalut !\n"


def cfg(**overrides: object) -> DownloadConfig:
    """A small config; `url` points at a closed port so any network use fails loudly."""
    return download_cfg(f"http://127.0.0.1:{free_port()}/fra-eng.zip", **overrides)


def lie_about_size(data: bytes, declared: int) -> bytes:
    """Rewrite the first central-directory entry's uncompressed size to `declared`."""
    out = bytearray(data)
    struct.pack_into("<I", out, out.find(b"PK\x01\x02") + 24, declared)
    return bytes(out)


GOOD = build_zip({"__MACOSX/fra-eng/._fra.txt": b"\0" * 212, "fra-eng/fra.txt": CORPUS})

BAD_ARCHIVES: dict[str, tuple[bytes, str]] = {
    "zip_slip_parent": (build_zip({"../evil.txt": b"x", "fra-eng/fra.txt": CORPUS}), "zip-slip"),
    "zip_slip_nested": (build_zip({"fra-eng/../../evil.txt": b"x", "fra.txt": CORPUS}), "'..'"),
    "zip_slip_absolute": (build_zip({"/abs.txt": b"x", "fra-eng/fra.txt": CORPUS}), "/abs.txt"),
    "zip_slip_drive": (build_zip({"C:/x.txt": b"x", "fra-eng/fra.txt": CORPUS}), "C:/x.txt"),
    "zip_slip_backslash": (build_zip({"..\\evil.txt": b"x", "fra.txt": CORPUS}), "zip-slip"),
    "zip_slip_in_macosx": (build_zip({"__MACOSX/../../e": b"x", "fra.txt": CORPUS}), "zip-slip"),
    "bomb_ratio": (build_zip({"fra-eng/fra.txt": b"\0" * 900_000}), "max_compression_ratio"),
    "bomb_total": (
        build_zip({"fra-eng/fra.txt": CORPUS, "pad.bin": b"x" * 1_100_000}, zipfile.ZIP_STORED),
        "max_uncompressed_bytes",
    ),
    "missing_member": (build_zip({"fra-eng/_about.txt": b"about"}), "no member named 'fra.txt'"),
    "macosx_only": (build_zip({"__MACOSX/fra-eng/._fra.txt": b"\0" * 212}), "no member"),
    "macosx_named_exactly": (build_zip({"__MACOSX/fra-eng/fra.txt": CORPUS}), "no member"),
    "two_members": (build_zip({"a/fra.txt": CORPUS, "b/fra.txt": CORPUS}), "2 members"),
    "not_a_zip": (b"<html><body>Access denied</body></html>", "not a zip archive"),
    "empty_file": (b"", "not a zip archive"),
    "truncated_zip": (GOOD[: len(GOOD) // 2], "not a zip archive"),
}


def listing(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was used")

    monkeypatch.setattr(requests.Session, "send", refuse)


def test_snapshot_passes_checks_with_real_params() -> None:
    params = load_params(REPO_ROOT / "params.yaml").download
    assert sha256_file(SNAPSHOT) == params.sha256 == SNAPSHOT_SHA256
    assert check_archive(SNAPSHOT, params) == "fra-eng/fra.txt"
    corpus = read_corpus_member(SNAPSHOT, params)
    assert len(corpus) == 11_669_748
    assert corpus.startswith(b"Go.\t")


def test_bundled_copy_is_used_without_network(tmp_path: Path, no_network: None) -> None:
    out = tmp_path / "raw" / "fra-eng.zip"  # parent does not exist yet
    config = cfg(
        sha256=SNAPSHOT_SHA256,
        bundled="data/external/fra-eng.zip",  # relative to repo_root
        retries=3,
        max_uncompressed_bytes=50_000_000,
    )
    result = fetch_corpus(config, out, REPO_ROOT)
    assert result == FetchResult(out, SNAPSHOT_SHA256, "bundled", 3_424_571)
    assert out.read_bytes() == SNAPSHOT.read_bytes()
    assert (tmp_path / "raw" / "fra-eng.zip.sha256").read_text() == (
        f"{SNAPSHOT_SHA256}  fra-eng.zip\n"
    )
    assert sorted(os.listdir(out.parent)) == ["fra-eng.zip", "fra-eng.zip.sha256"]


def test_bundled_copy_replaces_previous_output(tmp_path: Path, no_network: None) -> None:
    bundled = tmp_path / "bundled.zip"
    bundled.write_bytes(GOOD)
    out = tmp_path / "out" / "fra-eng.zip"
    out.parent.mkdir()
    out.write_bytes(b"old")
    digest = hashlib.sha256(GOOD).hexdigest()
    result = fetch_corpus(cfg(sha256=digest.upper(), bundled=str(bundled)), out, REPO_ROOT)
    assert (result.source, result.sha256, result.bytes) == ("bundled", digest, len(GOOD))
    assert out.read_bytes() == GOOD


@pytest.mark.parametrize("name", sorted(BAD_ARCHIVES))
def test_check_archive_refuses(tmp_path: Path, name: str) -> None:
    data, needle = BAD_ARCHIVES[name]
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    with pytest.raises(ArchiveError) as info:
        check_archive(path, cfg())
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    with pytest.raises(ArchiveError):
        read_corpus_member(path, cfg())


@pytest.mark.parametrize("name", ["zip_slip_parent", "bomb_ratio", "macosx_only", "not_a_zip"])
def test_bad_bundled_archive_never_reaches_output(
    tmp_path: Path, name: str, no_network: None
) -> None:
    data = BAD_ARCHIVES[name][0]
    bundled = tmp_path / "bundled.zip"
    bundled.write_bytes(data)
    config = cfg(sha256=hashlib.sha256(data).hexdigest(), bundled=str(bundled))
    fresh = tmp_path / "fresh" / "fra-eng.zip"
    with pytest.raises(ArchiveError, match=f"archive from {bundled} refused"):
        fetch_corpus(config, fresh, REPO_ROOT)
    assert os.listdir(fresh.parent) == []
    kept = tmp_path / "kept" / "fra-eng.zip"
    kept.parent.mkdir()
    kept.write_bytes(GOOD)
    kept.with_name("fra-eng.zip.sha256").write_text("old  fra-eng.zip\n")
    before = listing(kept.parent)
    with pytest.raises(ArchiveError):
        fetch_corpus(config, kept, REPO_ROOT)
    assert listing(kept.parent) == before


def test_macosx_junk_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(GOOD)
    assert check_archive(path, cfg()) == "fra-eng/fra.txt"
    assert read_corpus_member(path, cfg()) == CORPUS


def test_small_compressible_members_are_not_bombs(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(build_zip({"fra-eng/fra.txt": CORPUS, "fra-eng/_about.txt": b" " * 4000}))
    assert check_archive(path, cfg()) == "fra-eng/fra.txt"


def test_lying_declared_size_is_caught_while_reading(tmp_path: Path) -> None:
    real = b"a" * 5_000_000  # deflates to ~5 kB: a 1000:1 bomb
    path = tmp_path / "liar.zip"
    path.write_bytes(lie_about_size(build_zip({"fra-eng/fra.txt": real}), 100_000))
    config = cfg(max_uncompressed_bytes=200_000)
    assert check_archive(path, config) == "fra-eng/fra.txt"  # the declared sizes look fine
    with pytest.raises(ArchiveError, match="liar.zip:fra-eng/fra.txt"):
        read_corpus_member(path, config)


def test_read_limited_counts_bytes() -> None:
    assert _read_limited(io.BytesIO(b"x" * 10), 10, "w") == b"x" * 10
    with pytest.raises(ArchiveError, match="expands past 9 bytes"):
        _read_limited(io.BytesIO(b"x" * 10), 9, "w")


def test_missing_archive_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="dvc repro download"):
        read_corpus_member(tmp_path / "nope.zip", cfg())


def test_corpus_member_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(build_zip({"deu-eng/deu.txt": CORPUS}))
    config = dataclasses.replace(cfg(), corpus_member="deu.txt")
    assert read_corpus_member(path, config) == CORPUS
