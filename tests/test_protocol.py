"""The message protocol: the upload format travels in the train config and back, checked."""

import pytest
from flwr.app import ConfigRecord
from hypothesis import given
from hypothesis import strategies as st

from fedlpt import protocol
from fedlpt.quant import BFP


@given(
    bits=st.integers(2, 16),
    block=st.one_of(st.sampled_from(["tensor", "row", "kernel"]), st.integers(1, 1 << 20)),
    rounding=st.sampled_from(["nearest", "stochastic"]),
)
def test_the_upload_format_crosses_a_config_record_intact(bits, block, rounding) -> None:
    fmt = BFP(bits, block, rounding)
    config = ConfigRecord()
    protocol.write_upload_format(config, fmt)
    assert protocol.read_upload_format(config) == fmt


def test_fp32_uploads_are_announced_as_32_bits() -> None:
    config = ConfigRecord()
    protocol.write_upload_format(config, None)
    assert dict(config) == {"fedlpt.upload.bits": 32}
    assert protocol.read_upload_format(config) is None


def test_a_config_without_or_with_a_bad_format_is_named() -> None:
    with pytest.raises(ValueError, match=r"announces no upload format"):
        protocol.read_upload_format(ConfigRecord({"server-round": 1}))
    with pytest.raises(ValueError, match=r"bits must be in 2\.\.16, got 1"):
        protocol.read_upload_format(
            {
                "fedlpt.upload.bits": 1,
                "fedlpt.upload.block": "row",
                "fedlpt.upload.rounding": "nearest",
            }
        )


def test_server_round_is_read_and_checked() -> None:
    assert protocol.server_round({"server-round": 3}) == 3
    assert protocol.server_round({}) == 0
    with pytest.raises(ValueError, match="server-round must be a non-negative int"):
        protocol.server_round({"server-round": -1})
