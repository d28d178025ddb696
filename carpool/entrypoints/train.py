"""The training commands: corpus, train-tokenizer, pretokenize, train, eval.

A whole run from nothing (see scripts/train_demo.sh):
    carpool corpus runs/data/manifest.json --packages torch numpy
    carpool train-tokenizer --manifest runs/data/manifest.json --vocab-size 8192 --out runs/tokenizer
    carpool pretokenize --manifest runs/data/manifest.json --tokenizer runs/tokenizer --out runs/data
    carpool train --config run.toml --data.train runs/data/train --nproc-per-node 2
    carpool eval runs/train/export --data runs/data/heldout

Multi-node: run `torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT
-m carpool.entrypoints.cli train ...` on every node; the trainer reads torchrun's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from carpool.entrypoints.cli import subcommand


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="MANIFEST", help="where to write the manifest JSON")
    p.add_argument("--no-stdlib", action="store_true", help="leave out the Python standard library")
    p.add_argument("--packages", nargs="*", default=[], metavar="DIST",
                   help="installed distributions whose .py sources to add (license from their metadata)")
    p.add_argument("--skip-missing", action="store_true", help="ignore --packages that are not installed")
    p.add_argument("--heldout-fraction", type=float, default=0.02,
                   help="fraction of files (by content hash) held out for evaluation (default: 0.02)")
    p.add_argument("--max-file-bytes", type=int, default=1 << 20, help="skip larger files (generated tables)")


@subcommand("corpus", "collect a training corpus of local Python sources into a manifest (no download)",
            _corpus_args)
def run_corpus(ns: argparse.Namespace) -> int:
    import importlib.metadata

    from carpool.training.corpus import build_manifest, license_summary

    packages = list(ns.packages)
    if ns.skip_missing:
        def installed(name: str) -> bool:
            try:
                importlib.metadata.distribution(name)
                return True
            except importlib.metadata.PackageNotFoundError:
                return False
        packages = [p for p in packages if installed(p)]
    manifest = build_manifest(not ns.no_stdlib, packages, ns.heldout_fraction, ns.max_file_bytes)
    os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
    manifest.save(ns.out)
    print(json.dumps({"manifest": ns.out, "files": len(manifest.files), "bytes": manifest.num_bytes(),
                      "heldout_files": len(manifest.files_of("heldout")), "corpus_sha256": manifest.corpus_sha256,
                      "sources": license_summary(manifest)}, indent=1))
    return 0


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="corpus manifest (from `carpool corpus`)")
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary (default: 8192)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="train on the first N bytes of the train split only (faster; default: all)")


@subcommand("train-tokenizer", "train a byte-level BPE tokenizer on a corpus' train split", _tokenizer_args)
def run_train_tokenizer(ns: argparse.Namespace) -> int:
    from carpool.training.corpus import Manifest, iter_documents
    from carpool.training.tokenizer_trainer import train_bpe_tokenizer

    manifest = Manifest.load(ns.manifest)

    def texts():  # type: ignore[no-untyped-def]
        seen = 0
        for text in iter_documents(manifest, "train"):
            if ns.max_bytes is not None and seen >= ns.max_bytes:
                return
            seen += len(text)
            yield text

    tok = train_bpe_tokenizer(texts(), ns.vocab_size)
    tok.save_pretrained(ns.out)
    print(json.dumps({"tokenizer": ns.out, "vocab_size": len(tok)}))
    return 0


def _pretokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="corpus manifest (from `carpool corpus`)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="directory for train.bin/.json and heldout.bin/.json")
    p.add_argument("--splits", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])


@subcommand("pretokenize", "write a corpus' token ids to memory-mapped token files", _pretokenize_args)
def run_pretokenize(ns: argparse.Namespace) -> int:
    from carpool.training.corpus import Manifest, iter_documents
    from carpool.training.pretokenize import pretokenize

    manifest = Manifest.load(ns.manifest)
    result = {}
    for split in ns.splits:
        meta = pretokenize(iter_documents(manifest, split), ns.tokenizer, os.path.join(ns.out, split), split,
                           manifest.corpus_sha256)
        result[split] = {"tokens": meta.num_tokens, "documents": meta.num_documents, "dtype": meta.dtype}
    print(json.dumps(result))
    return 0


TRAIN_EPILOG = """\
launching:
  one process:          carpool train --config run.toml --data.train DATA/train
  N processes here:     carpool train ... --parallel.strategy fsdp --nproc-per-node N
                        (spawns them as torchrun does; gloo on CPU, NCCL on GPUs)
  under torchrun:       torchrun --nproc-per-node N -m carpool.entrypoints.cli train ...
  several nodes:        on every node, torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d
                        --rdzv-endpoint HOST:PORT -m carpool.entrypoints.cli train ... (the trainer
                        reads RANK/WORLD_SIZE/LOCAL_RANK from torchrun's rendezvous)

A run resumes from the latest complete checkpoint in --checkpoint.dir; bad values, a missing data file,
a vocabulary smaller than the data's tokenizer or an unwritable output directory are reported before the
model is built. Outputs in --output-dir: metrics.jsonl, summary.json, loss_curve.png (with matplotlib),
checkpoints/, export/ (Hugging Face format).
"""


def _train_args(p: argparse.ArgumentParser) -> None:
    from carpool.training.config import add_config_args

    p.epilog = TRAIN_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_args(p)


@subcommand("train", "train a causal LM with carpool's model classes (DDP/FSDP2, bf16, checkpoints)", _train_args)
def run_train(ns: argparse.Namespace) -> int:
    from carpool.training.config import config_from_args
    from carpool.training.trainer import train

    cfg = config_from_args(ns)
    nproc = cfg.parallel.nproc_per_node
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(nproc, cfg)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("steps", "final_train_loss", "heldout_loss", "heldout_ppl", "tokens_seen", "tokens_per_s", "mfu",
                "elapsed_s", "export_dir")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0


def _launch(nproc: int, cfg) -> int:  # noqa: ANN001
    """Run this same command in `nproc` processes, as torchrun would (torch.distributed.run,
    standalone rendezvous on this machine); each process sees WORLD_SIZE and does not launch again."""
    if cfg.parallel.strategy == "none":
        raise ValueError("parallel.strategy: 'none' cannot run on several processes; choose ddp or fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "carpool.entrypoints.cli", *sys.argv[1:]]
    return subprocess.call(cmd)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="exported Hugging Face checkpoint directory")
    p.add_argument("--data", help="held-out token file (from `carpool pretokenize`) for perplexity")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per evaluated sequence (default: 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: 8)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate only the first N sequences")
    p.add_argument("--code-manifest", help="corpus manifest: also measure how many completions of held-out "
                   "Python function headers parse")
    p.add_argument("--code-prompts", type=int, default=100, help="function headers to complete (default: 100)")
    p.add_argument("--code-max-tokens", type=int, default=64, help="tokens per completion (default: 64)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


@subcommand("eval", "held-out perplexity (and Python completion parse rate) of an exported model", _eval_args)
def run_eval(ns: argparse.Namespace) -> int:
    from carpool.training.corpus import Manifest
    from carpool.training.evaluate import function_completion_parse_rate, heldout_perplexity

    if not ns.data and not ns.code_manifest:
        raise ValueError("eval: give --data (perplexity) and/or --code-manifest (completion parse rate)")
    result: dict[str, object] = {"model": ns.model}
    if ns.data:
        result["heldout"] = heldout_perplexity(ns.model, ns.data, ns.seq_len, ns.batch_size, ns.max_sequences,
                                               ns.device)
    if ns.code_manifest:
        result["code"] = function_completion_parse_rate(ns.model, Manifest.load(ns.code_manifest), ns.code_prompts,
                                                        ns.code_max_tokens, device=ns.device)
    print(json.dumps(result, indent=1))
    return 0
