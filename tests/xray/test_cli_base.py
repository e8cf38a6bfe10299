import sys
import types

import pytest
import torch

from xray.cli_base import parse_device, parse_shard, run_command
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
