"""Corpus records: a question id given twice is refused with the ids and rows named."""

import time
from dataclasses import replace

import pytest

from vrag_rl.data.records import load_qa, write_qa


def test_duplicate_question_ids_fail_to_load_and_are_named(bundled_corpus, tmp_path):
    records = load_qa(bundled_corpus)[:5]
    write_qa(records, tmp_path / "qa.parquet")
    assert load_qa(tmp_path) == records
    twice = [*records, replace(records[1], question="another question"), replace(records[3], answer="x")]
    write_qa(twice, tmp_path / "qa.parquet")
    with pytest.raises(ValueError, match="2 question ids appear more than once") as err:
        load_qa(tmp_path)
    message = str(err.value)
    assert f"{records[1].qid!r} (rows [1, 5])" in message and f"{records[3].qid!r} (rows [3, 6])" in message


def hold_lock(directory, ready):
    """A second process holding ``directory``'s writer lock until it is killed."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from vrag_rl.data.records import writer_lock\n"
        "with writer_lock(Path(sys.argv[1]), 'corpus'):\n"
        "    Path(sys.argv[2]).touch(); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory), str(ready)])
    for _ in range(600):
        if ready.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the lock holder never started")


def test_a_second_writer_stops_with_the_holder_named(tmp_path, bundled_corpus, embedder):
    import shutil

    from vrag_rl.data.records import WriterBusy, writer_lock
    from vrag_rl.retrieval.index import MultiVectorIndex
    from vrag_rl.retrieval.ingest import ingest

    corpus = tmp_path / "corpus"
    shutil.copytree(bundled_corpus, corpus)
    holder = hold_lock(corpus, tmp_path / "ready")
    try:
        busy = f"corpus {corpus} is being written by another process \\(pid {holder.pid}\\)"
        with pytest.raises(WriterBusy, match=busy):
            ingest([tmp_path / "nothing"], corpus, progress=False)
        with pytest.raises(WriterBusy):
            MultiVectorIndex.build(corpus, corpus, embedder, progress=False)  # the same folder as an index
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(corpus, "corpus"):  # the kernel released the dead holder's lock
        pass


def test_manifest_rows_naming_files_outside_the_corpus_are_refused_and_named(bundled_corpus, tmp_path):
    from vrag_rl.data.records import load_pages, write_pages

    pages = [replace(p, file=f"pages/{p.page_id}.jpg") for p in load_pages(bundled_corpus)[:3]]
    pages[2] = replace(pages[2], file=str(tmp_path / "pages" / f"{pages[2].page_id}.jpg"))  # absolute, inside
    write_pages(pages, tmp_path / "pages.parquet")
    assert [p.file for p in load_pages(tmp_path)] == [str(tmp_path / "pages" / f"{p.page_id}.jpg") for p in pages]
    outside = [
        replace(pages[0], page_id="up_1", file="../secret.jpg"),
        replace(pages[0], page_id="abs_1", file=str(tmp_path.parent / "secret.jpg")),
        replace(pages[0], page_id="round_1", file="pages/../../secret.jpg"),
    ]
    write_pages(pages + outside, tmp_path / "pages.parquet")
    with pytest.raises(ValueError, match="3 rows name files outside the corpus") as err:
        load_pages(tmp_path)
    assert all(f"'{p.page_id}' ({p.file!r})" in str(err.value) for p in outside)
