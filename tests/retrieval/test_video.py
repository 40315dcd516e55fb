"""Videos as pages, with videos the tests make (frames drawn with PIL, encoded by PyAV's FFmpeg): frames sampled at
the interval and at scene changes, timestamps in the manifest, resumable ingest, corrupt and truncated files
reported, frames over the pixel limit refused before decoding, sampling stopped at the page cap, and the agent
searching and cropping frames as it does pages."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from vrag_rl.data.records import load_pages
from vrag_rl.retrieval.ingest import IngestConfig, ingest
from vrag_rl.retrieval.video import FrameSampling, sample_frames

FPS = 5
# (seconds, background colour, caption): three static scenes cut at 2 s and 7 s
SCENES = [
    (2.0, (30, 60, 160), "Quarterly revenue"),
    (5.0, (200, 200, 60), "Market share"),
    (3.0, (40, 150, 70), "Staff"),
]
SAMPLING = FrameSampling(interval_s=4.0, scene_change=0.12, min_gap_s=0.5)
KEPT_TIMES = [0.0, 2.0, 6.0, 7.0]  # the start, the first cut, 4 s later, the second cut


def scene_frame(colour, caption: str) -> np.ndarray:
    image = Image.new("RGB", (320, 240), colour)
    ImageDraw.Draw(image).text((20, 100), caption, fill="white", font=ImageFont.load_default(size=28))
    return np.asarray(image)


def make_video(path: Path, codec: str) -> Path:
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
    for seconds, colour, caption in SCENES:
        frame = av.VideoFrame.from_ndarray(scene_frame(colour, caption), format="rgb24")
        for _ in range(round(seconds * FPS)):
            out.mux(stream.encode(frame))
    out.mux(stream.encode())
    out.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("videos")
    for name, codec in (("talk.mp4", "mpeg4"), ("demo.webm", "libvpx"), ("clip.mkv", "libx264"), ("reel.mov", "mpeg4")):
        make_video(src / name, codec)
    return src


def test_frames_are_kept_at_the_interval_and_at_scene_changes(videos):
    for video in sorted(videos.iterdir()):
        kept, truncated = sample_frames(video, SAMPLING)
        assert [round(t, 2) for _, t in kept] == KEPT_TIMES and truncated is None, video.name
        assert [k for k, _ in kept] == [round(t * FPS) for t in KEPT_TIMES]


def test_videos_become_pages_with_timestamps_and_resume(videos, tmp_path):
    corpus = tmp_path / "corpus"
    cfg = IngestConfig(video=SAMPLING)
    result = ingest([videos], corpus, cfg, progress=False)
    assert result.problems == [] and result.pages_written == 4 * len(KEPT_TIMES)
    pages = load_pages(corpus)
    assert {p.doc for p in pages} == {"talk", "demo", "clip", "reel"}
    for doc in ("talk", "demo", "clip", "reel"):
        frames = [p for p in pages if p.doc == doc]
        assert [p.page_id for p in frames] == [f"{doc}_{n}" for n in range(1, 5)]
        assert [p.timestamp for p in frames] == KEPT_TIMES and {p.kind for p in frames} == {"video"}
        colours = [SCENES[0][1], SCENES[1][1], SCENES[1][1], SCENES[2][1]]
        for page, colour in zip(frames, colours):
            with Image.open(page.file) as im:
                corner = np.asarray(im.convert("RGB"))[5:25, 5:25].reshape(-1, 3).mean(axis=0)
            assert np.abs(corner - colour).max() < 12, (page.page_id, corner, colour)  # the frame shown then
    again = ingest([videos], corpus, cfg, progress=False)
    assert (again.pages_written, again.pages_reused) == (0, 4 * len(KEPT_TIMES))
    finer = ingest([videos], corpus, IngestConfig(video=FrameSampling(interval_s=1.0)), progress=False)
    assert finer.pages_written == 4 * 10 and finer.pages_reused == 0  # one a second over 10 s: sampled again


def test_corrupt_and_truncated_videos_are_reported_and_the_rest_ingested(videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.webm").write_bytes((videos / "demo.webm").read_bytes())
    data = (videos / "talk.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(data[: len(data) // 2])  # its index is at the end: FFmpeg cannot open it
    webm = (videos / "demo.webm").read_bytes()
    (src / "short.webm").write_bytes(webm[: len(webm) // 2])  # plays, but ends early
    (src / "noise.mkv").write_bytes(b"\x1aE\xdf\xa3 not really matroska" * 200)
    result = ingest([src], tmp_path / "corpus", IngestConfig(video=SAMPLING), progress=False)
    problems = {Path(p.source).name: p for p in result.problems}
    assert problems["cut.mp4"].reason == problems["noise.mkv"].reason == "corrupt video"
    assert problems["short.webm"].reason == "truncated video" and "of the 10.00 s" in problems["short.webm"].detail
    pages = load_pages(tmp_path / "corpus")
    assert [p.timestamp for p in pages if p.doc == "good"] == KEPT_TIMES
    short = [p.timestamp for p in pages if p.doc == "short"]
    assert short and short == KEPT_TIMES[: len(short)]  # what it holds is kept


def test_the_agent_searches_and_crops_frames_as_pages(videos, tmp_path, embedder, encoder, warm_policy):
    from vrag_rl.agent.images import crop_view, page_view
    from vrag_rl.retrieval.index import MultiVectorIndex
    from vrag_rl.retrieval.local import LocalRetriever
    from vrag_rl.retrieval.types import IndexConfig
    from vrag_rl.rollout.agent_loop import AgentConfig, AgentLoop
    from vrag_rl.rollout.engine import SamplingConfig
    from vrag_rl.rollout.hf_engine import HFEngine
    from vrag_rl.rollout.records import Task

    corpus = tmp_path / "corpus"
    ingest([videos / "talk.mp4"], corpus, IngestConfig(video=SAMPLING), progress=False)
    MultiVectorIndex.build(tmp_path / "index", corpus, embedder, IndexConfig(dtype="float32"), progress=False)
    retriever = LocalRetriever(corpus, tmp_path / "index", embedder)
    with Image.open(retriever.page_path("talk_3")) as im:
        frame = im.convert("RGB")
    assert retriever.search_by_image([frame], 1)[0][0].page_id == "talk_3"
    cfg = AgentConfig(max_turns=2, max_length=2048)
    view = page_view("talk_3", frame.size, cfg.budget)
    cropped = crop_view(view, (0, 0, view.shown_size[0] // 2, view.shown_size[1] // 2), frame, cfg.budget)
    assert not isinstance(cropped, str)
    loop = AgentLoop(HFEngine(str(warm_policy), "float32", "cpu"), encoder, retriever, cfg)
    (rollout,) = loop.run([Task("q", "What is the market share?")], SamplingConfig(temperature=0.0, max_tokens=64))
    assert rollout.retrieved_pages and all(p.startswith("talk_") for p in rollout.retrieved_pages)


def test_frames_are_shown_with_their_times(videos, tmp_path):
    """The demo's events, the evaluation's browsing page and the watch transcripts name a frame with its time."""
    from vrag_rl.data.records import page_label
    from vrag_rl.evaluation.browse import write_browser
    from vrag_rl.serving.events import View

    corpus = tmp_path / "corpus"
    ingest([videos / "talk.mp4"], corpus, IngestConfig(video=SAMPLING), progress=False)
    frame = {p.page_id: p for p in load_pages(corpus)}["talk_3"]
    assert page_label(frame.page_id, frame.timestamp) == "talk_3 (at 6.0 s)"
    assert View.of("talk_3", None, {"talk_3": (320, 240, frame.timestamp)}).to_json()["timestamp"] == 6.0
    row = {
        "qid": "v:1",
        "data_source": "video",
        "category": "",
        "question": "What is the market share?",
        "reference": "40",
        "gold_pages": ["talk_3"],
        "retrieval": {"ndcg@10": 1.0},
        "trajectory": {
            "texts": ["<search>share</search>"],
            "actions": [{"kind": "search"}],
            "views": [[0, "talk_3", None]],
        },
    }
    page = write_browser([row], corpus, tmp_path / "browse", "video").read_text()
    assert "talk_3 (at 6.0 s): the page shown" in page


# One grey frame of 12288x8192 (100.7 M pixels, over the 89.5 M pages get) in a file of ~300 KB: H.264 with x264 on
# one thread keeps the encoder at ~650 MB. (16384x16384 is past what FFmpeg itself allocates for one frame.)
HUGE = (12288, 8192)
ENCODE = """
import sys
import av

out = av.open(sys.argv[1], "w")
stream = out.add_stream("libx264", rate=1, options={"preset": "ultrafast", "tune": "zerolatency", "threads": "1"})
stream.width, stream.height, stream.pix_fmt = int(sys.argv[2]), int(sys.argv[3]), "yuv420p"
frame = av.VideoFrame(stream.width, stream.height, "yuv420p")
for plane in frame.planes:
    plane.update(bytes([128]) * plane.buffer_size)
out.mux(stream.encode(frame))
out.mux(stream.encode())
out.close()
"""
# Ingest in a fresh process, reporting its peak resident memory in MB (VmHWM: getrusage's maxrss would carry over
# the peak of the process that started it).
INGEST = """
import json, re, sys
from pathlib import Path
from vrag_rl.retrieval.ingest import IngestConfig, ingest

ingest([sys.argv[1]], sys.argv[2], IngestConfig(**json.loads(sys.argv[3])), progress=False)
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024)
"""


@pytest.fixture(scope="module")
def huge_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge.mp4"
    subprocess.run([sys.executable, "-c", ENCODE, str(path), *map(str, HUGE)], check=True, timeout=300)
    return path


def ingest_peak(video: Path, corpus: Path, **cfg) -> tuple[dict, int]:
    """The run's ingest_report.json and the peak memory (MB) of the process that ran it."""
    run = subprocess.run(
        [sys.executable, "-c", INGEST, str(video), str(corpus), json.dumps(cfg)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads((corpus / "ingest_report.json").read_text()), int(run.stdout.split()[-1])


def test_frames_over_the_pixel_limit_are_refused_before_decoding(huge_video, tmp_path):
    """At the default limit the frame is refused from the stream's header, FFmpeg's probe held to the limit too: the
    process stays under 250 MB (decoded and converted whole, this file took 1.7 GB). Allowed by a higher limit, the
    frame is decoded alone and scaled to the page size by FFmpeg from its YUV planes: under 700 MB."""
    report, peak = ingest_peak(huge_video, tmp_path / "refused")
    (problem,) = report["problems"]
    assert problem["reason"] == "decompression bomb" and report["pages_written"] == 0
    assert "frames of 12288x8192 pixels (100663296), over the limit of 89478485" in problem["detail"]
    assert peak < 250, peak
    report, peak = ingest_peak(huge_video, tmp_path / "allowed", max_pixels=HUGE[0] * HUGE[1])
    assert report["problems"] == [] and report["pages_written"] == 1
    assert [(p.width, p.height) for p in load_pages(tmp_path / "allowed")] == [(2048, 1365)]
    assert peak < 700, peak


def make_spaced_video(path: Path, frames: int, gap_s: int) -> Path:
    """``frames`` frames of 64x48, ``gap_s`` seconds apart, each of another grey."""
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=1, options={"preset": "ultrafast"})
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for k in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * k, np.uint8), format="rgb24")
        frame.pts = k * gap_s
        out.mux(stream.encode(frame))
    out.mux(stream.encode())
    out.close()
    return path


def test_sampling_stops_at_the_page_cap_and_the_cap_is_reported(tmp_path):
    """Frames 5 s apart each pass the interval rule: a long file of them would give a page per frame. The pages
    stop at --max-pages, sampling stops there too, and the cap is reported (not as a problem: the video is good)."""
    (tmp_path / "src").mkdir()
    video = make_spaced_video(tmp_path / "src" / "slides.mkv", frames=40, gap_s=5)
    kept, truncated = sample_frames(video, FrameSampling(), max_frames=11)
    assert [t for _, t in kept] == [5.0 * k for k in range(11)] and truncated is None
    result = ingest([video], tmp_path / "c", IngestConfig(max_pages=10), progress=False)
    assert result.problems == [] and result.pages_written == 10
    assert [p.timestamp for p in load_pages(tmp_path / "c")] == [5.0 * k for k in range(10)]
    detail = "the first 10 frames, to 45.0 s (--max-pages 10)"
    assert result.capped == [{"source": str(video), "doc": "slides", "detail": detail}]
    assert f"capped             {video}: {detail}" in result.summary()
    everything = ingest([video], tmp_path / "c", IngestConfig(max_pages=40), progress=False)
    assert everything.capped == [] and (everything.pages_reused, everything.pages_written) == (10, 30)
