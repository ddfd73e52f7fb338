"""The telemetry stream: one record per request from the server's PUB socket."""

from __future__ import annotations

import numpy as np
import pytest
from support import wait_for
from wire_support import LOCAL, serving

from vla_steer.wire import (
    Client,
    Code,
    KnobsRequest,
    RemoteError,
    TelemetrySubscriber,
)


def test_telemetry_subscriber_receives_per_request_records() -> None:
    with (
        serving(telemetry_address=LOCAL) as srv,
        TelemetrySubscriber(srv.telemetry_address) as sub,
        Client(srv.address) as c,
    ):
        # PUB/SUB: records published before the subscription lands are lost; probe until one arrives.
        wait_for(lambda: (c.hello(), sub.recv(0.05))[1] is not None)
        sub.drain()
        for tag in range(5):
            c.infer({"tag": tag})
        with pytest.raises(RemoteError):
            c.knobs(KnobsRequest("explode"))
        records = []
        while len(records) < 6 and (rec := sub.recv(2.0)) is not None:
            records.append(rec)
    infers = [r for r in records if r.kind == "infer"]
    assert [r.telemetry["tag"] for r in infers] == list(range(5))
    np.testing.assert_array_equal(infers[2].telemetry["chunk"], np.full(7, 2.0, np.float32))
    for r in infers:
        assert r.ok and r.error_code is None
        assert set(r.latency_ms) == {"decode", "queue", "handler", "encode", "total"}
        assert all(v >= 0 for v in r.latency_ms.values())
        assert r.latency_ms["total"] >= r.latency_ms["handler"]
    assert len({r.request_id for r in infers}) == 5
    (bad,) = [r for r in records if r.kind == "knobs"]
    assert not bad.ok and bad.error_code == Code.BAD_PAYLOAD
