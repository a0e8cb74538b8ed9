"""What the ServerApp and the ClientApp say to each other: message keys and the round's settings.

The rule: **the strategy's ConfigRecord decides the round, the run config decides the
rest, and nothing is sent that is not read.** A train message carries the global model
and a ConfigRecord with the round number, the format the client uploads in (and FedProx's
``mu`` when that strategy is used); everything else a client needs (model, data, the
training recipe, local epochs) comes from the run config that every node already has.
A train reply carries the client's model (or its change to it, with delta uploads) and a
MetricRecord with exactly :data:`TRAIN_METRICS`.

Both apps import this module and nothing of each other's (Flower keeps its differential
privacy keys in ``flwr.common.differential_privacy_constants`` the same way). It is
plain Python: the records are read and written as mappings.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from .quant.bfp import BFP, FP32_BITS

# --- Train message, server -> client (ConfigRecord "config") ------------------------------
CONFIG_RECORD = "config"  # Flower's default configrecord_key
ARRAY_RECORD = "arrays"  # Flower's default arrayrecord_key
SERVER_ROUND = "server-round"  # written by every Flower strategy
PROXIMAL_MU = "proximal-mu"  # written by Flower's FedProx
UPLOAD_PREFIX = "fedlpt.upload."  # + each key of BFP.to_config(); bits 32 means FP32
UPLOAD_KIND = "fedlpt.upload-kind"  # "weights" (the paper) or "delta": w_local - w_received
# When present, the server tracks this node's copy of the model: the message's arrays are
# the difference to the copy the node kept after round DOWNLINK_BASE, or with -1 the full
# model, which becomes the node's copy.
DOWNLINK_BASE = "fedlpt.downlink-base"
FULL_MODEL = -1

# --- Replies, client -> server (MetricRecord "metrics") -----------------------------------
METRIC_RECORD = "metrics"
NUM_EXAMPLES = "num-examples"  # Flower's weighted_by_key
TRAIN_LOSS = "train-loss"
BITS = "bits"  # the bit width this node trained and uploaded in (32: FP32)
TRAIN_SECONDS = "train-seconds"
TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, BITS, TRAIN_SECONDS)
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-acc"
EVALUATE_METRICS = (NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY)


def write_upload_format(config: MutableMapping[str, object], fmt: BFP | None) -> None:
    """Announce the upload format of a round in its train ConfigRecord (``None``: FP32)."""
    if fmt is None:
        config[UPLOAD_PREFIX + "bits"] = FP32_BITS
        return
    for key, value in fmt.to_config().items():
        config[UPLOAD_PREFIX + key] = value


def read_upload_format(config: Mapping[str, object]) -> BFP | None:
    """The upload format a train ConfigRecord announces (``None``: FP32).

    Raises:
        ValueError: the record announces no format, or an unusable one (names the key).
    """
    fields = {
        key[len(UPLOAD_PREFIX) :]: value
        for key, value in config.items()
        if key.startswith(UPLOAD_PREFIX)
    }
    if fields.get("bits") == FP32_BITS:
        return None
    if not fields:
        raise ValueError(f"the train config announces no upload format ({UPLOAD_PREFIX}*)")
    return BFP.from_config(fields)


def server_round(config: Mapping[str, object]) -> int:
    """The round number a train or evaluate ConfigRecord carries (0 if absent)."""
    value = config.get(SERVER_ROUND, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{SERVER_ROUND} must be a non-negative int, got {value!r}")
    return value
