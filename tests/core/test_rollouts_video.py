"""mp4 of one episode's camera, decoded back."""

from __future__ import annotations

import numpy as np
import pytest

from vla_steer.core.rollouts import Recorder, write_video


def test_write_video_decodes_to_the_recorded_frames(tmp_path):
    av = pytest.importorskip("av")
    ep = Recorder(tmp_path / "store").start_episode({})
    shades = [0, 80, 160, 240]
    for s in shades:  # flat frames: lossy coding keeps their level to within a few steps
        ep.step(images={"cam": np.full((16, 24, 3), s, np.uint8)}, action=np.zeros(2, np.float32))
    ep.end()
    out = write_video(tmp_path / "store", ep.id, "cam", tmp_path / "v" / "cam.mp4")
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert [f.shape for f in frames] == [(16, 24, 3)] * 4
    np.testing.assert_allclose([f.mean() for f in frames], shades, atol=4)
    with pytest.raises(KeyError, match="no camera 'wrist'"):
        write_video(tmp_path / "store", ep.id, "wrist", tmp_path / "w.mp4")
