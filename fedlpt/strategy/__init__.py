"""Server-side strategy wrappers, each with one job, composed by the ServerApp.

From the outside in, as the ServerApp composes them (Flower's DP wrappers compose the
same way)::

    TrafficMeter(CodecStrategy(DeltaSync(ServerEMA(ReplyScreen(<any Flower strategy>)))))

* :class:`~fedlpt.strategy.traffic.TrafficMeter`: bytes per round, as serialized;
* :class:`~fedlpt.strategy.codec.CodecStrategy`: announces the upload format, encodes the
  downlink, decodes replies and drops the malformed ones;
* :class:`~fedlpt.strategy.delta.DeltaSync`: delta uploads rebuilt on what each node
  holds, and a downlink of error-fed differences to each node's copy;
* :class:`~fedlpt.strategy.ema.ServerEMA`: the server's moving average of the model;
* :class:`~fedlpt.strategy.screen.ReplyScreen`: only finite, well-formed, plausibly
  weighted replies reach aggregation, and only a finite aggregate leaves it;
* :mod:`~fedlpt.strategy.registry`: the Flower strategies a run can name.

Names are imported lazily, so that ``import fedlpt.strategy.registry`` (the run-config
parser does it) loads no wrapper and no Flower strategy.
"""

from __future__ import annotations

from .._lazy import lazy_face

_HOMES = {
    "COMMON_PARAMS": "registry",
    "STRATEGIES": "registry",
    "StrategyEntry": "registry",
    "build_strategy": "registry",
    "StrategyWrapper": "base",
    "DroppedReply": "base",
    "CodecStrategy": "codec",
    "DeltaSync": "delta",
    "ServerEMA": "ema",
    "ReplyScreen": "screen",
    "RunFailedError": "screen",
    "WEIGHTINGS": "registry",
    "RoundTraffic": "traffic",
    "TrafficMeter": "traffic",
    "serialized_size": "traffic",
}
__all__, __getattr__, __dir__ = lazy_face(__name__, _HOMES)
