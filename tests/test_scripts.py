"""scripts/_venv.sh: where the scripts find (or make) their virtualenv.

Runs the script's path logic for real in bash, against a stand-in virtualenv that is
already "installed" (its stamp file present), so nothing is created or downloaded; a
``python3`` that fails loudly sits first on PATH in case the script ever tried to install.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_venv(where: Path) -> Path:
    # The stamp _venv.sh looks for: the first 12 hex digits of pyproject.toml's sha1.
    stamp = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (where / "bin").mkdir(parents=True)
    (where / f".installed-{stamp}").touch()
    probe = where / "bin" / "bp-probe"
    probe.write_text("#!/bin/sh\necho probe-ran\n")
    probe.chmod(0o755)
    return where


def _source(venv_setting: str, tmp_path: Path) -> list[str]:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "python3").write_text("#!/bin/sh\necho 'would install' >&2\nexit 97\n")
    (guard / "python3").chmod(0o755)
    script = 'source scripts/_venv.sh && echo "$VENV" && command -v bp-probe && bp-probe'
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**os.environ, "BATCHPIPE_VENV": venv_setting, "PATH": f"{guard}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "would install" not in result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_batchpipe_venv_absolute_or_relative_puts_its_bin_on_path(tmp_path: Path, how: str) -> None:
    venv = _fake_venv(tmp_path / "elsewhere" / "venv")
    setting = str(venv) if how == "absolute" else os.path.relpath(venv, ROOT)
    venv_line, found, ran = _source(setting, tmp_path)
    assert Path(venv_line).resolve() == venv
    assert Path(found).resolve() == venv / "bin" / "bp-probe"
    assert ran == "probe-ran"


@pytest.mark.parametrize("script", ["_venv.sh", "test", "demo"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
