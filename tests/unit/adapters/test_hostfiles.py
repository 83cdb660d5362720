"""executor.adapters.hostfiles: console tails, the runner's files, the config and image files."""

from __future__ import annotations

import re

import pytest

from executor.adapters import hostfiles
from executor.adapters.hostfiles import console_tail, load_settings, write_build_exit_code
from executor.core.settings import CONFIG_PATH_ENV
from executor.errors import ConfigError

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# --- console_tail ------------------------------------------------------------------------------


def test_console_tail_strips_control_characters(tmp_path):
    log = tmp_path / "c.log"
    log.write_bytes(b"\x1b[31mred\x1b[0m\r\nbell\x07 and nul\x00\ttab\x7f\nlast line\n")
    tail = console_tail(log)
    assert tail == "[31mred[0m\nbell and nul\ttab\nlast line"
    assert not CONTROL.search(tail)


def test_console_tail_returns_only_the_last_lines_of_a_big_file(tmp_path):
    log = tmp_path / "c.log"
    log.write_text("".join(f"line {i}\n" for i in range(200_000)))  # ~2.3 MB
    assert console_tail(log).split("\n") == [f"line {i}" for i in range(199_975, 200_000)]
    assert console_tail(log, lines=3) == "line 199997\nline 199998\nline 199999"


def test_console_tail_reads_a_bounded_amount(tmp_path):
    log = tmp_path / "c.log"
    log.write_bytes(b"x" * 1_000_000)  # one enormous line
    assert len(console_tail(log, limit=4096)) == 4096


def test_console_tail_survives_invalid_utf8_and_missing_files(tmp_path):
    log = tmp_path / "c.log"
    log.write_bytes(b"ok \xff\xfe bytes\n")
    assert console_tail(log) == "ok \ufffd\ufffd bytes"
    assert console_tail(tmp_path / "absent.log") == ""


# --- loading ---------------------------------------------------------------------------------


def test_load_missing_file_names_it_and_says_what_to_do(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    message = str(info.value)
    assert str(path) in message and "does not exist" in message
    assert "libvirt-executor setup" in message and "--config" in message and CONFIG_PATH_ENV in message


def test_load_unreadable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(str(tmp_path))  # a directory


def test_load_reports_problems_under_the_file_name(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[vm]\nvcpus = 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    assert str(info.value).startswith(f"{path}: invalid configuration")


def test_load_valid_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[vm]\nname_prefix = "ci2"\n')
    assert load_settings(str(path)).vm.name_prefix == "ci2"


# --- BUILD_EXIT_CODE_FILE ----------------------------------------------------------------------


_ATOI_FIRST_LINE = re.compile(r"[+-]?[0-9]+")  # Go strconv.Atoi: no spaces, no trailing junk


@pytest.mark.parametrize("status", [0, 1, 42, 255, 137])
def test_write_build_exit_code_writes_a_bare_integer_line(tmp_path, status):
    path = tmp_path / "build_exit_code"
    write_build_exit_code(status, {"BUILD_EXIT_CODE_FILE": str(path)})
    data = path.read_bytes()
    assert data == f"{status}\n".encode()
    first_line = data.decode().split("\n")[0]
    assert _ATOI_FIRST_LINE.fullmatch(first_line) and int(first_line) == status


def test_write_build_exit_code_overwrites_a_stale_value(tmp_path):
    path = tmp_path / "build_exit_code"
    path.write_text("123456789\nleftover from an earlier stage\n")
    write_build_exit_code(7, {"BUILD_EXIT_CODE_FILE": str(path)})
    assert path.read_text() == "7\n"


def test_write_build_exit_code_without_the_variable_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_build_exit_code(7, {})
    write_build_exit_code(7, {"BUILD_EXIT_CODE_FILE": ""})
    assert list(tmp_path.iterdir()) == []


def test_read_secret_takes_the_first_line_of_a_root_only_file(tmp_path):
    path = tmp_path / "pw"
    path.write_text("s3cret\nignored\n")
    path.chmod(0o600)
    assert hostfiles.read_secret(str(path), "mirror.password_file") == "s3cret"


@pytest.mark.parametrize(
    ("content", "mode", "problem"), [("s3cret\n", 0o644, "is mode 644; make it 0600"), ("\n", 0o600, "is empty")]
)
def test_read_secret_refuses_a_readable_or_empty_file_without_showing_it(tmp_path, content, mode, problem):
    path = tmp_path / "pw"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match="mirror.password_file") as info:
        hostfiles.read_secret(str(path), "mirror.password_file")
    assert problem in str(info.value) and "s3cret" not in str(info.value)


def test_read_secret_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*/missing"):
        hostfiles.read_secret(str(tmp_path / "missing"), "mirror.password_file")
