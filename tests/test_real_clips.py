"""The real-clip check of the Video-BLADE recipe: six real videos as windows labelled by source."""

import json

import pytest
import torch

from sparsedistill.data import real_clips
from sparsedistill.data.real_clips import SOURCES, RealClips


def _numbered_videos(frames: int = 40) -> dict[str, torch.Tensor]:
    """Fake decoded videos whose every pixel is its frame number, plus 100 per source: a clip tells where it came from."""
    return {name: (torch.arange(frames)[:, None, None] + 100 * (i + 1)).expand(frames, 20, 30).to(torch.int32)
            for i, name in enumerate(SOURCES)}


def test_clips_are_windows_of_their_source_split_in_time_and_a_function_of_the_index(monkeypatch):
    monkeypatch.setattr(real_clips, "load_real_frames", lambda short_side=96: _numbered_videos())
    train = RealClips.from_split("train", frames=4, size=16)
    test = RealClips.from_split("test", frames=4, size=16)
    videos, labels = train.clips(range(50), seed=3)
    assert videos.shape == (50, 1, 4, 16, 16) and labels.unique().numel() == 6
    value = ((videos + 1) * 127.5).round().long()[:, 0, :, 0, 0]  # (clip, frame) -> 100 * (source + 1) + frame
    source, frame = value // 100 - 1, value % 100
    assert torch.equal(source, labels[:, None].expand_as(source))
    assert ((frame[:, 1:] - frame[:, :-1]) == 1).all()  # consecutive frames
    assert frame.max() < 32  # the first 80 % of 40 frames train
    test_videos, _ = test.clips(range(50), seed=3)
    assert ((((test_videos + 1) * 127.5).round().long() % 100) >= 32).all()  # ... the rest are the reference
    again, again_labels = train.clips([7, 2], seed=3)
    assert torch.equal(again, videos[[7, 2]]) and torch.equal(again_labels, labels[[7, 2]])
    fixed, fixed_labels = train.clips(range(6), seed=3, labels=[5, 4, 3, 2, 1, 0])
    assert fixed_labels.tolist() == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="one source in 0..5"):
        train.clips(range(2), labels=[6, 0])
    with pytest.raises(ValueError, match="too few"):
        RealClips.from_split("test", frames=9, size=16)  # 8 reference frames a source
    # on the clips' device, labels too (a GPU teacher's loss mixes them with the videos): "meta" stands in for CUDA
    meta_videos, meta_labels = RealClips(_numbered_videos(), frames=4, size=16, device="meta").clips(range(3))
    assert meta_videos.device.type == meta_labels.device.type == "meta"


@pytest.fixture
def real_frames() -> dict[str, torch.Tensor]:
    """The six videos decoded (once, then cached); skipped where neither PyPI av with the videos nor a prepared
    frames file is here, e.g. on a GPU machine the frames were not carried to. A $SPARSEDISTILL_REAL_CLIPS that
    names a missing file is a misconfiguration: it fails."""
    import os

    from sparsedistill.data import DatasetNotFound

    try:
        return real_clips.load_real_frames()
    except DatasetNotFound as e:
        if os.environ.get("SPARSEDISTILL_REAL_CLIPS"):
            raise
        pytest.skip(str(e))


def test_real_videos_decode_to_grey_frames_of_every_source(real_frames):
    videos = real_frames
    assert list(videos) == list(SOURCES)
    for name, v in videos.items():
        assert v.dtype == torch.uint8 and min(v.shape[1:]) == 96 and v.shape[0] >= 60, name
        assert v.float().std() > 10, name  # pictures, not a blank decode


def test_video_recipe_runs_on_real_clips_and_refuses_a_model_of_other_classes(tmp_path, real_frames):
    from sparsedistill.config import load_config
    from sparsedistill.recipes.video_blade import VideoBladeConfig, run_video_blade, validate

    sets = ["teacher.steps=6", "classifier.steps=4", "students.tdm.iterations=1", "eval.videos=6", "eval.batch=6",
            "eval.bootstrap=20", "sampling.steps=4", 'students.variants=["tdm"]', 'model.name="video_dit_real_tiny"',
            'data.source="real_clips"']
    cfg = load_config(VideoBladeConfig, "short", sets, recipe="video")
    report = run_video_blade(cfg, tmp_path / "run", progress=False)
    res = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())
    assert res["data"] == "real_clips"
    assert list(res["models"]) == ["teacher-4", "teacher-k2", "teacher-k2-cfg1", "tdm-k2", "tdm+asa-k2"]
    assert "six real videos" in report.read_text()
    with pytest.raises(ValueError, match="has 6 classes but model 'video_dit_fmnist_tiny' takes 10; use e.g. video_dit_real"):
        validate(load_config(VideoBladeConfig, "short", ['data.source="real_clips"'], recipe="video"))
    with pytest.raises(ValueError, match="data.source 'webvid' is not known"):
        validate(load_config(VideoBladeConfig, "short", ['data.source="webvid"'], recipe="video"))
