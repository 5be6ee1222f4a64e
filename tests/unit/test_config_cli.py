"""Configuration parsing and the CLI's handling of bad input: one clear line, exit code 2."""
from __future__ import annotations

import pytest

from pyhv.cli.commands import main
from pyhv.config import VmConfig, parse_size
from pyhv.errors import ConfigError


@pytest.mark.parametrize("text,value", [("128M", 128 << 20), ("1G", 1 << 30), ("4096K", 4 << 20), ("64", 64 << 20),
                                        ("2GiB", 2 << 30), ("1048576B", 1 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "-5M", "1.5G"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(list(argv)))
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("argv,needle", [
    (["run", "--firmware", "/nonexistent/bios.bin"], "does not exist"),
    (["run", "--firmware", "EMPTY"], "is empty"),
    (["run", "--firmware", "HUGE"], "more than the 16 MiB"),
    (["run", "--firmware", "OK", "--memory", "1M"], "too small"),
    (["run", "--firmware", "OK", "--memory", "4097K"], "multiple of 4 KiB"),
    (["run", "--firmware", "OK", "--cpus", "0"], "between 1 and 64"),
    (["run", "--firmware", "OK", "--memory", "lots"], "not a size"),
    (["run", "--firmware", "OK", "--serial", "tcp:1234"], "unknown backend"),
    (["run", "--firmware", "OK", "--serial", "file:"], "needs a path"),
    (["run", "--firmware", "OK", "--device", "gpu"], "unknown device"),
    (["run", "--bogus"], "unrecognized arguments"),
    (["run", "--initrd", "OK"], "--initrd needs --kernel"),
    (["run", "--firmware", "OK", "--acpi", "maybe"], "argument --acpi: invalid choice: 'maybe'"),
    (["run", "--firmware", "OK", "--cpus", "300"], "between 1 and 64"),
    (["run", "-M", "microvm", "--firmware", "OK", "--nic", "tap,ifname=t0,model=e1000"], "needs --machine pc"),
    (["run", "--firmware", "OK", "--nic", "tap,ifname=t0,model=rtl8139"], "model 'rtl8139' is not supported"),
])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys, argv, needle):
    (tmp_path / "EMPTY").write_bytes(b"")
    with open(tmp_path / "HUGE", "wb") as f:
        f.truncate(17 << 20)
    (tmp_path / "OK").write_bytes(b"\0" * 65536)
    argv = [str(tmp_path / a) if a in ("EMPTY", "HUGE", "OK") else a for a in argv]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--firmware", "--memory", "--cpus", "--serial", "--stats", "--dump-mtree", "--on-reset"):
        assert option in out


def test_config_round_trips_through_a_dict(tmp_path):
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"\0" * 4096)
    cfg = VmConfig(firmware=str(fw), memory=64 << 20, cpus=2).validate()
    again = VmConfig.from_dict(cfg.to_dict()).validate()
    assert again == cfg
