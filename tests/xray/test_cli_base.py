import argparse
import sys
import types
import warnings

import pytest
import torch

from xray.cli_base import ArgumentParser, check_output, finite_float, make_main, parse_device, parse_shard, run_command
from xray.errors import UserError


def test_parse_device_known_answers():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("auto") == parse_device(None)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu0", ""])
def test_parse_device_rejects_garbage(bad):
    with pytest.raises(UserError, match="--device"):
        parse_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_parse_device_cuda_without_cuda():
    with pytest.raises(UserError, match="CUDA is not available"):
        parse_device("cuda")


def test_finite_float_known_answers_and_one_line_refusals(capsys):
    p = ArgumentParser(prog="x")
    p.add_argument("--t", type=finite_float(0, 10, lo_open=True), default=1.0)
    p.add_argument("--clip", type=finite_float(0, lo_open=True, none=True), default=argparse.SUPPRESS)
    assert p.parse_args(["--t", "10", "--clip", "None"]) == argparse.Namespace(t=10.0, clip=None)
    assert p.parse_args(["--t", "1e-3", "--clip", "2"]).clip == 2.0
    for argv, said in ((["--t", "nan"], "'nan' is not finite"), (["--t", "inf"], "not finite"), (["--t", "0"], "0 is out of range"),
                       (["--t", "10.5"], "out of range; expected a finite number > 0 and <= 10"),
                       (["--t", "abc"], "'abc' is not a number"), (["--clip=-inf"], "or 'none'")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and said in err and argv[0].split("=")[0] in err


def test_console_scripts_print_warnings_as_one_line(monkeypatch):
    seen = []
    mod = types.ModuleType("fake_warn_cmd")
    mod.HELP = "warns"
    mod.configure = lambda p: None
    mod.main = lambda args: seen.append(warnings.formatwarning("the cache is\n  old", UserWarning, "/x/y.py", 3, "src()")) or 0
    monkeypatch.setitem(sys.modules, "fake_warn_cmd", mod)
    main = make_main("x", "test", {"w": "fake_warn_cmd"})
    before = warnings.formatwarning
    for argv in (["w"], ["-v", "w"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and warnings.formatwarning is before  # restored after the command
    assert seen[0] == "warning: the cache is old\n"
    assert "/x/y.py:3" in seen[1]  # -v: Python's own form, with file and line


def test_parse_shard_known_answers():
    assert parse_shard("2/4") == (2, 4) and parse_shard("0/1") == (0, 1) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1", "1/0", "-1/3"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_run_command_parses_like_the_cli_and_raises_on_a_failing_status(monkeypatch):
    seen = []
    mod = types.ModuleType("fake_command")
    mod.configure = lambda p: p.add_argument("--n", type=int, required=True)
    mod.main = lambda args: seen.append(args.n) or (0 if args.n < 5 else 3)
    monkeypatch.setitem(sys.modules, "fake_command", mod)
    run_command("fake_command", ["--n", 2])  # argv items are turned into strings
    assert seen == [2]
    with pytest.raises(UserError, match="fake_command exited with status 3"):
        run_command("fake_command", ["--n", "7"])


def test_check_output_refuses_a_symlink_loop_or_dangling_link_in_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    for path in (tmp_path / "a", tmp_path / "a" / "sub", tmp_path / "gone"):
        with pytest.raises(UserError, match=r"^--out \S+: \S+ is a symbolic link that leads nowhere .*; remove the link") as e:
            check_output(path, "--out", "folder")
        assert "\n" not in str(e.value)
    # the command: one line, exit 2, nothing made
    main = make_main("xray", "test", {"phantom": "xray.commands.phantom"})
    with pytest.raises(SystemExit) as e:
        main(["phantom", "--out", str(tmp_path / "a"), "--n", "2", "--size", "32", "--seed", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --out ") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "gone"]
