"""The model card (README.md) of an exported model, written from the run's own records.

Every number in the card comes from a file the run wrote: the trainer's summary.json (steps, tokens,
losses, device, minutes), `carpool eval`'s JSON (held-out perplexity, the ast-parse fraction), and the
corpus manifest (files, hash, licenses). Nothing is typed in by hand.

    python -m carpool.training.model_card --export runs/main/export --summary runs/main/summary.json \
        --eval runs/main/eval.json --manifest runs/data/manifest.json --command "scripts/train_demo.sh runs"
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from carpool.training.corpus import Manifest, license_summary


def _fmt_int(n: float | int | None) -> str:
    return "n/a" if n is None else f"{int(n):,}"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_model_card(name: str, hf_config: dict[str, Any], summary: dict[str, Any], evaluation: dict[str, Any],
                      manifest: Manifest, command: str, pipeline_seconds: float | None = None,
                      train_tokens: int | None = None, role: str = "") -> str:
    cfg = summary["config"]
    heldout = evaluation.get("heldout", {})
    code = evaluation.get("code")
    params = summary["num_params"]
    lines = [
        "---",
        "library_name: carpool",
        "pipeline_tag: text-generation",
        "tags: [llama, code, python, carpool]",
        "---",
        f"# {name}",
        "",
        f"A {params / 1e6:.1f}M-parameter Llama-architecture causal LM trained from scratch by `carpool train` "
        f"on Python source code{role}. It continues Python; it is a demo of the training pipeline, "
        "not a useful assistant.",
        "",
        "## Model",
        "",
        "| | |", "|---|---|",
        f"| architecture | {hf_config['architectures'][0]} |",
        f"| parameters | {_fmt_int(params)} |",
        f"| layers / hidden / MLP | {hf_config['num_hidden_layers']} / {hf_config['hidden_size']} / "
        f"{hf_config['intermediate_size']} |",
        f"| heads / KV heads / head dim | {hf_config['num_attention_heads']} / {hf_config['num_key_value_heads']} / "
        f"{hf_config.get('head_dim')} |",
        f"| vocabulary | {hf_config['vocab_size']} (byte-level BPE trained on the same corpus) |",
        f"| context | {hf_config['max_position_embeddings']} positions, trained at {cfg['seq_len']} |",
        f"| tied embeddings | {hf_config.get('tie_word_embeddings', False)} |",
        f"| weights | {hf_config.get('torch_dtype', 'bfloat16')} safetensors |",
        "",
        "## Training",
        "",
        "```", command, "```", "",
        "| | |", "|---|---|",
        f"| device | {summary['device']} x {summary['world_size']} |",
        f"| training time | {summary['elapsed_s'] / 60:.1f} min |",
    ]
    if pipeline_seconds is not None:
        lines.append(f"| whole pipeline (corpus, tokenizer, tokens, training, export, eval) | "
                     f"{pipeline_seconds / 60:.1f} min |")
    batch = cfg["seq_len"] * cfg["micro_batch_size"] * cfg["grad_accum_steps"] * summary["world_size"]
    lines += [
        f"| steps | {summary['steps']}" + (" (stopped by the time limit)" if summary.get("stopped_by_time_limit")
                                            else "") + " |",
        f"| tokens seen | {_fmt_int(summary['tokens_seen'])} ({batch:,} per step)"
        + (f", {summary['tokens_seen'] / train_tokens:.1f} epochs" if train_tokens else "") + " |",
        f"| optimizer | AdamW lr {cfg['optim']['lr']}, betas {tuple(cfg['optim']['betas'])}, weight decay "
        f"{cfg['optim']['weight_decay']}, {cfg['optim']['warmup_steps']} warmup steps then cosine to "
        f"{cfg['optim']['min_lr_ratio']} x lr, grad clip {cfg['optim']['grad_clip']} |",
        f"| precision | {cfg['precision']} (fp32 master weights and optimizer states) |",
        f"| throughput | {_fmt_int(summary.get('tokens_per_s'))} tokens/s"
        + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") else "") + " |",
        f"| final train loss (mean of the last 10 steps) | {_fmt(summary.get('final_train_loss'))} |",
        "",
        "## Evaluation (held-out files)",
        "",
        "| | |", "|---|---|",
        f"| held-out loss | {_fmt(heldout.get('loss'))} nats/token over {_fmt_int(heldout.get('tokens'))} tokens |",
        f"| held-out perplexity | {_fmt(heldout.get('perplexity'), '.2f')} |",
    ]
    if code:
        lines += [
            f"| Python function completions that parse (`ast.parse`) | {code['parse_fraction']:.0%} of "
            f"{code['prompts']} held-out function headers, greedy, {code['max_tokens']} tokens, cut at the "
            "function's end |",
            f"| completions that ended the function within the budget | {code['ended_within_budget']:.0%} |",
        ]
        if evaluation.get("code_note"):
            lines.append(f"| how the completions were measured | {evaluation['code_note']} |")
    lines += [
        "",
        "## Data",
        "",
        f"Python source files found on the training machine, nothing downloaded: {len(manifest.files):,} files "
        f"({manifest.num_bytes() / 1e6:.1f} MB) after removing duplicates, Python {manifest.python_version}. "
        f"Files are split by content hash: {manifest.heldout_fraction:.0%} held out "
        f"({len(manifest.files_of('heldout'))} files). Corpus sha256 (over every file's path and sha256): "
        f"`{manifest.corpus_sha256}`; the full file list with hashes is `corpus_manifest.json.gz` beside this card.",
        "",
        "| source | version | license | files | MB |", "|---|---|---|---|---|",
    ]
    for s in license_summary(manifest):
        lines.append(f"| {s['name']} | {s['version']} | {s['license']} | {s['num_files']} | "
                     f"{int(s['num_bytes']) / 1e6:.1f} |")
    lines += ["", "The licenses above are those the sources declare (the Python standard library: PSF-2.0; "
              "installed distributions: their metadata). They cover the training text; check them before "
              "redistributing outputs that reproduce it."]
    if code and code.get("examples"):
        lines += ["", "## Examples (greedy, held-out headers)", ""]
        for ex in code["examples"]:
            lines += [f"From `{ex['file']}` (parses: {ex['parses']}):", "", "```python",
                      (ex["prompt"] + ex["completion"]).rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(export_dir: str, summary_path: str, eval_path: str, manifest_path: str, command: str,
                     name: str, pipeline_seconds: float | None = None, train_tokens: int | None = None,
                     role: str = "") -> str:
    with open(os.path.join(export_dir, "config.json")) as f:
        hf_config = json.load(f)
    with open(summary_path) as f:
        summary = json.load(f)
    with open(eval_path) as f:
        evaluation = json.load(f)
    manifest = Manifest.load(manifest_path)
    text = render_model_card(name, hf_config, summary, evaluation, manifest, command, pipeline_seconds,
                             train_tokens, role)
    path = os.path.join(export_dir, "README.md")
    with open(path, "w") as f:
        f.write(text)
    manifest.save(os.path.join(export_dir, "corpus_manifest.json.gz"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write README.md (the model card) into an exported model")
    p.add_argument("--export", required=True)
    p.add_argument("--summary", required=True, help="the trainer's summary.json")
    p.add_argument("--eval", required=True, help="`carpool eval` JSON output")
    p.add_argument("--manifest", required=True, help="corpus manifest")
    p.add_argument("--command", required=True, help="the command that produced the model")
    p.add_argument("--name", required=True)
    p.add_argument("--role", default="", help="extra words after 'on Python source code'")
    p.add_argument("--pipeline-seconds", type=float, default=None)
    p.add_argument("--train-tokens", type=int, default=None, help="tokens in the train split (for epochs)")
    ns = p.parse_args(argv)
    print(write_model_card(ns.export, ns.summary, ns.eval, ns.manifest, ns.command, ns.name, ns.pipeline_seconds,
                           ns.train_tokens, ns.role))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
