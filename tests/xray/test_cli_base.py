import pytest
import torch

from xray.cli_base import parse_device
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
