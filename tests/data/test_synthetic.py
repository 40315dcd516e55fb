import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from vrag_rl.data.records import load_pages, load_qa
from vrag_rl.data.report_words import entity_names
from vrag_rl.data.synthetic import (
    KINDS,
    SyntheticConfig,
    encode_jpeg,
    generate,
    main,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[2]
CFG = SyntheticConfig(num_docs=4, pages_per_doc=4, page_size=(400, 560), seed=7)


def _decode(data: bytes | Path) -> np.ndarray:
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, CFG, progress=False)
    return out


@pytest.fixture(scope="module")
def pages(corpus):
    """(page record, decoded grayscale pixels, questions on the page) for the written corpus."""
    qa = load_qa(corpus)
    out = []
    for p in load_pages(corpus):
        gray = np.asarray(Image.open(p.file).convert("L"), dtype=float)
        out.append((p, gray, [q for q in qa if q.answer_box[0] == p.page_id]))
    return out


def test_same_seed_gives_identical_records_and_pixels(corpus, tmp_path):
    write_corpus(tmp_path, CFG, progress=False)
    assert load_qa(tmp_path) == load_qa(corpus)
    again = [dataclasses.replace(p, file=Path(p.file).name) for p in load_pages(tmp_path)]
    assert again == [dataclasses.replace(p, file=Path(p.file).name) for p in load_pages(corpus)]
    for p in load_pages(corpus):
        assert np.array_equal(_decode(Path(p.file)), _decode(tmp_path / "pages" / Path(p.file).name))


def test_different_seed_gives_different_corpus(corpus):
    other = list(generate(dataclasses.replace(CFG, seed=8)))
    assert [q.answer for p in other for q in p.questions] != [q.answer for q in load_qa(corpus)]
    assert set(entity_names(7, 4)).isdisjoint(entity_names(8, 4))
    first = np.asarray(other[0].image)
    assert not np.array_equal(first, _decode(corpus / "pages" / "doc0000_1.jpg"))


def test_documents_do_not_depend_on_corpus_size():
    """Doc k renders the same in a corpus of any size, so corpora can be generated in shards."""
    small = list(generate(dataclasses.replace(CFG, num_docs=2)))
    large = list(generate(CFG))[: len(small)]
    assert [p.questions for p in small] == [p.questions for p in large]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(small, large))


def test_layout_of_pages_and_questions(corpus, pages):
    assert [p.page_id for p, _, _ in pages] == [f"doc{d:04d}_{k}" for d in range(4) for k in range(1, 5)]
    assert {p.kind for p, _, _ in pages} == set(KINDS)
    for p, gray, questions in pages:
        assert Path(p.file) == corpus / "pages" / f"{p.page_id}.jpg"
        assert p.checksum == hashlib.sha256(Path(p.file).read_bytes()).hexdigest() and p.source == "synthetic:seed=7"
        assert gray.shape == (p.height, p.width) == (560, 400)
        assert questions, f"page {p.page_id} has no question"
        assert p.page_id == f"{p.doc}_{p.page}"
    qa = load_qa(corpus)
    assert len({q.qid for q in qa}) == len(qa)
    page_kind = {p.page_id: p.kind for p, _, _ in pages}
    for q in qa:
        assert q.gold_pages == [q.answer_box[0]] and q.gold_pages[0] in page_kind
        assert q.category == page_kind[q.gold_pages[0]]
        assert q.entity in q.question and q.answer and q.data_source == "synthetic"


def _rendered_alone(text: str, w: int, h: int) -> list[np.ndarray]:
    """``text`` drawn alone in Pillow's bundled font at every size whose ink box is exactly w x h."""
    out = []
    for size in range(6, 80):
        f = ImageFont.load_default(size=size)
        x0, y0, x1, y1 = f.getbbox(text)
        if (x1 - x0, y1 - y0) == (w, h):
            im = Image.new("L", (w, h), 255)
            ImageDraw.Draw(im).text((-x0, -y0), text, font=f, fill=0)
            out.append(np.asarray(im, dtype=float))
    return out


def _best_match(crop: np.ndarray, text: str) -> float:
    """Highest correlation of the crop with ``text`` rendered alone (0 if no size has the crop's shape)."""
    best = 0.0
    for ref in _rendered_alone(text, crop.shape[1], crop.shape[0]):
        a, b = crop - crop.mean(), ref - ref.mean()
        best = max(best, float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9)))
    return best


def test_answer_boxes_hold_exactly_the_printed_answer(pages):
    for p, gray, questions in pages:
        for q in questions:
            _, x0, y0, x1, y1 = q.answer_box
            assert 0 <= x0 < x1 <= p.width and 0 <= y0 < y1 <= p.height, q
            crop = gray[y0:y1, x0:x1]
            dark_rows, dark_cols = np.nonzero(crop < 128)
            assert len(dark_rows), f"{q.qid}: nothing printed in the answer box"
            # tight: ink reaches every edge of the box
            assert dark_rows.min() <= 2 and dark_rows.max() >= crop.shape[0] - 3, q.qid
            assert dark_cols.min() <= 2 and dark_cols.max() >= crop.shape[1] - 3, q.qid
            # the ink is the answer string itself, not some other text of the same size
            assert _best_match(crop, q.answer) > 0.97, q.qid
            last = q.answer[-1]
            wrong = q.answer[:-1] + ("7" if last != "7" else "1") if last.isdigit() else q.answer[::-1]
            assert _best_match(crop, wrong) < 0.97, q.qid


def test_page_margins_are_blank(pages):
    rng = random.Random(0)
    for p, gray, _ in pages:
        strips = [gray[:10, :], gray[:, :10], gray[:, -10:], gray[-8:, :]]
        assert all(s.min() > 230 for s in strips), p.page_id
        x, y = rng.randrange(0, p.width - 10), rng.randrange(0, 10)
        assert gray[y : y + 8, x : x + 10].min() > 230


def test_entity_names_are_unique_and_distinct_from_other_names():
    names = entity_names(0, 3000)
    cores = [n.split()[0] for n in names]
    assert len(set(cores)) == len(cores) == 3000
    qa = [q for p in generate(dataclasses.replace(CFG, num_docs=12)) for q in p.questions]
    used = {q.entity.split()[0] for q in qa}
    for q in qa:
        assert not set(q.answer.split()) & used, f"answer {q.answer!r} reuses a company name"


def test_bundled_corpus_equals_regeneration(bundled_corpus):
    meta = json.loads((bundled_corpus / "meta.json").read_text())
    assert meta["complete"] and meta["generator"] == "vrag_rl.data.synthetic"
    cfg = SyntheticConfig.from_dict(meta["config"])
    fresh = list(generate(cfg))
    assert load_qa(bundled_corpus) == [q for p in fresh for q in p.questions]
    stored = load_pages(bundled_corpus)
    # checksums are those of the stored files: another libjpeg may encode the same pixels to other bytes
    blank = dict(file="", checksum="")
    assert [dataclasses.replace(p, **blank) for p in stored] == [dataclasses.replace(f.record, **blank) for f in fresh]
    assert all(p.checksum == hashlib.sha256(Path(p.file).read_bytes()).hexdigest() for p in stored)
    for p, f in zip(stored, fresh):
        diff = np.abs(_decode(Path(p.file)).astype(int) - _decode(encode_jpeg(f.image, cfg.jpeg_quality)).astype(int))
        assert diff.max() <= 2, p.page_id


def test_qa_parquet_schema(corpus):
    schema = pq.read_schema(corpus / "qa.parquet")
    assert schema.field("gold_pages").type == pa.list_(pa.string())
    box = schema.field("answer_box").type
    assert pa.types.is_struct(box) and [box.field(i).name for i in range(box.num_fields)] == [
        "page_id",
        "x0",
        "y0",
        "x1",
        "y1",
    ]


def test_resume_completes_an_interrupted_run_and_refuses_another_config(corpus, tmp_path):
    write_corpus(tmp_path, CFG, progress=False)
    (tmp_path / "pages" / "doc0002_3.jpg").unlink()
    (tmp_path / "qa.parquet").unlink()
    write_corpus(tmp_path, CFG, progress=False)
    assert load_qa(tmp_path) == load_qa(corpus)
    assert (tmp_path / "pages" / "doc0002_3.jpg").read_bytes() == (corpus / "pages" / "doc0002_3.jpg").read_bytes()
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="another config"):
        write_corpus(tmp_path, dataclasses.replace(CFG, seed=8), progress=False)


@pytest.mark.parametrize(
    "change",
    [
        {"num_docs": 0},
        {"num_docs": -3},
        {"num_docs": True},
        {"num_docs": 2.0},
        {"pages_per_doc": 0},
        {"pages_per_doc": 13},
        {"page_size": (100, 100)},
        {"page_size": (800,)},
        {"page_size": "800x1100"},
        {"page_size": (800, 300)},
        {"jpeg_quality": 0},
        {"jpeg_quality": 96},
        {"seed": -1},
        {"seed": "0"},
    ],
)
def test_bad_config_raises(change):
    with pytest.raises(ValueError):
        dataclasses.replace(CFG, **change)


def test_config_round_trips_through_json():
    assert SyntheticConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG


def test_cli_writes_corpus(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path / "c"),
            "--docs",
            "2",
            "--pages-per-doc",
            "2",
            "--width",
            "400",
            "--height",
            "560",
            "--seed",
            "7",
            "--no-progress",
        ]
    )
    assert "wrote 4 pages" in capsys.readouterr().out
    expected = [q for p in generate(dataclasses.replace(CFG, num_docs=2, pages_per_doc=2)) for q in p.questions]
    assert load_qa(tmp_path / "c") == expected
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "d"), "--width", "10"])


def test_module_runs_as_a_script(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "vrag_rl.data.synthetic",
        "--out",
        str(tmp_path),
        "--docs",
        "1",
        "--pages-per-doc",
        "1",
        "--width",
        "400",
        "--height",
        "560",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    assert [p.page_id for p in load_pages(tmp_path)] == ["doc0000_1"]
