"""Downloads: checksums, retries, and nothing half-written left behind."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from neural_kernels.data.download import download_file, parse_checksum, verify_checksum
from neural_kernels.errors import ChecksumError, DownloadError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, several read chunks


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


@pytest.fixture
def served(archive_server):
    (archive_server.root / "blob.tar.gz").write_bytes(PAYLOAD)
    return archive_server


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_verifies_md5_and_sha256(served, tmp_path):
    dest = tmp_path / "out" / "blob.tar.gz"
    download_file(served.url("blob.tar.gz"), dest, md5(PAYLOAD), retries=0)
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["blob.tar.gz"]
    sha = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    assert verify_checksum(dest, sha)
    assert not verify_checksum(dest, md5(b"other"))


def test_existing_good_file_is_kept_without_network(served, tmp_path):
    dest = tmp_path / "blob.tar.gz"
    dest.write_bytes(PAYLOAD)
    download_file(served.url("blob.tar.gz"), dest, md5(PAYLOAD))
    assert sum(served.hits.values()) == 0


def test_existing_bad_file_is_replaced(served, tmp_path):
    dest = tmp_path / "blob.tar.gz"
    dest.write_bytes(PAYLOAD[:1000])  # a truncated earlier copy
    download_file(served.url("blob.tar.gz"), dest, md5(PAYLOAD), retries=0)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_checksum_names_file_and_leaves_nothing(served, tmp_path):
    dest = tmp_path / "out" / "blob.tar.gz"
    with pytest.raises(ChecksumError) as info:
        download_file(served.url("blob.tar.gz"), dest, md5(b"something else"), retries=0)
    message = str(info.value)
    assert "checksum mismatch" in message and str(dest) in message
    assert "checksum' in the config" in message
    assert leftovers(dest.parent) == []


def test_truncated_archive_on_server_fails_checksum(served, tmp_path):
    (served.root / "short.tar.gz").write_bytes(PAYLOAD[: len(PAYLOAD) // 3])
    dest = tmp_path / "short.tar.gz"
    with pytest.raises(ChecksumError, match="short.tar.gz"):
        download_file(served.url("short.tar.gz"), dest, md5(PAYLOAD), retries=0)
    assert leftovers(tmp_path) == ["served"]


def test_http_404_is_not_retried_and_leaves_nothing(served, tmp_path):
    dest = tmp_path / "missing.tar.gz"
    url = served.url("missing.tar.gz")
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(url, dest, md5(PAYLOAD), retries=3, backoff=0)
    assert url in str(info.value) and str(dest) in str(info.value)
    assert served.hits["/files/missing.tar.gz"] == 1
    assert not dest.exists() and leftovers(tmp_path) == ["served"]


def test_transient_503_is_retried(served, tmp_path):
    dest = tmp_path / "blob.tar.gz"
    download_file(served.url("blob.tar.gz", "flaky/2"), dest, md5(PAYLOAD), retries=3, backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert served.hits["/flaky/2/blob.tar.gz"] == 3


def test_retries_exhausted_on_503(served, tmp_path):
    dest = tmp_path / "blob.tar.gz"
    with pytest.raises(DownloadError, match="after 2 attempts.*HTTP 503"):
        download_file(
            served.url("blob.tar.gz", "flaky/5"), dest, md5(PAYLOAD), retries=1, backoff=0
        )
    assert leftovers(tmp_path) == ["served"]


def test_cut_transfer_is_retried_then_reported(served, tmp_path):
    dest = tmp_path / "blob.tar.gz"
    with pytest.raises(DownloadError, match="cut short") as info:
        download_file(served.url("blob.tar.gz", "cut"), dest, md5(PAYLOAD), retries=2, backoff=0)
    assert "after 3 attempts" in str(info.value)
    assert served.hits["/cut/blob.tar.gz"] == 3
    assert leftovers(tmp_path) == ["served"]


def test_unreachable_host(tmp_path):
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(DownloadError, match="network error"):
        download_file("http://127.0.0.1:9/x.tar.gz", dest, md5(b""), retries=0, timeout=2)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "bad",
    ["c58f30108f718f92721af3b95e74349a", "crc32:1234", "md5:xyz", "md5:abcd", "sha256:" + "0" * 32],
)
def test_malformed_checksum_is_rejected(bad):
    with pytest.raises(ValueError, match="checksum"):
        parse_checksum(bad)


def test_cli_download_error_is_one_clear_line(served, tmp_path):
    dest = tmp_path / "blob.tar.gz"
    result = subprocess.run(
        [sys.executable, "-m", "neural_kernels", "-q", "download", "--url",
         served.url("blob.tar.gz"), "--checksum", md5(b"x"), "--out", str(dest), "--retries", "0"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checksum mismatch" in errors[0] and str(dest) in errors[0]
    assert "Traceback" not in result.stderr
    assert not dest.exists()


def test_cli_download_by_source_name_into_directory(served, tmp_path):
    dest_dir = tmp_path / "res"
    result = subprocess.run(
        [sys.executable, "-m", "neural_kernels", "-q", "download", "--source", "cifar10",
         "--url", served.url("blob.tar.gz"), "--checksum", md5(PAYLOAD), "--out", f"{dest_dir}/"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (dest_dir / "cifar-10-python.tar.gz").read_bytes() == PAYLOAD
