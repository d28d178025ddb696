"""Token files of the shipped demo model's held-out split, from the Python sources on *this* machine.

The model card's manifest (`corpus_manifest.json.gz`) lists every training and held-out file of the
machine that trained it, by sha256. This machine has other versions of most of those files; the ones it
holds byte for byte keep their split (held-out files were never trained on). This writes:
  OUT/heldout.{bin,json}   those held-out files, tokenized with the model's tokenizer
  OUT/train.{bin,json}     up to --train-files of its training files (calibration data, e.g. GPTQ)
and the restricted manifest OUT/heldout_manifest.json (for `carpool eval --code-manifest`).

    python scripts/demo_heldout_tokens.py OUT [--model carpool/demo_models/main]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import os

from carpool.training.corpus import Manifest, build_manifest, iter_documents
from carpool.training.demo_model import trained_demo_model_path
from carpool.training.pretokenize import pretokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default=trained_demo_model_path("main"))
    ap.add_argument("--train-files", type=int, default=300)
    args = ap.parse_args()
    if args.model is None:
        raise SystemExit("--model: the package ships no trained demo model; name an export directory")
    trained = Manifest.load(f"{args.model}/corpus_manifest.json.gz")
    installed = []
    for source in trained.sources:
        if source.name == "python-stdlib":
            continue
        try:
            importlib.metadata.distribution(source.name)
            installed.append(source.name)
        except importlib.metadata.PackageNotFoundError:
            pass
    here = build_manifest(True, installed, trained.heldout_fraction)
    split_of = {f.sha256: f.split for f in trained.files}
    heldout = tuple(f for f in here.files if split_of.get(f.sha256) == "heldout")
    train = tuple(itertools.islice((f for f in here.files if split_of.get(f.sha256) == "train"), args.train_files))
    if not heldout:
        raise SystemExit("no held-out file of the model's manifest is on this machine byte for byte")
    os.makedirs(args.out, exist_ok=True)
    heldout_manifest = dataclasses.replace(here, files=heldout)
    heldout_manifest.save(f"{args.out}/heldout_manifest.json")
    result = {}
    for name, manifest in (("heldout", heldout_manifest), ("train", dataclasses.replace(here, files=train))):
        meta = pretokenize(iter_documents(manifest, name), args.model, f"{args.out}/{name}", split=name)
        result[name] = {"files": len(manifest.files), "tokens": meta.num_tokens}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
