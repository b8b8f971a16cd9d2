"""The ``lorakit`` command: argparse subcommands that parse their arguments and call library functions.

Everything a subcommand does is a library call (``lorakit.train.run_sft``, ``lorakit.evaluate.exact_match``,
``lorakit.merge_and_unload``, ``lorakit.inspect.check_fit``, ``lorakit.estimate.estimate_training``, …), so it can
be tested and scripted without the command line. Errors a user can fix (a typo in a config key, a task name or an
option, a missing file, an adapter for another base) print one ``lorakit: error: …`` line and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]

_DTYPES = ("bfloat16", "float16", "float32")
# Prompts a merge is checked on: a task prompt, a chat turn and code, so that several token statistics are covered.
_MERGE_PROMPTS = ("Convert this date to ISO format YYYY-MM-DD. Reply with the date only.\nDate: March 5, 2021",
                  "Hello! In one sentence, what is a low-rank adapter?",
                  "def add(a, b):\n    return")


class _UsageError(Exception):
    """A command-line mistake (unknown command or option, bad value); reported in one line, exit status 2."""


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line and a hint
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# --- commands


def _train(ns: argparse.Namespace) -> int:
    from . import train

    from .starter import resolve_config

    config = resolve_config(ns.config) if ns.config else None  # a file, or a built-in name such as sft_lora
    args = train.load_args(train.DPOArgs if ns.dpo else train.SFTArgs, config, ns.set)
    recipe = train.run_dpo if ns.dpo else train.run_sft
    data = args.train_file or f"task {args.task!r}"
    print(f"lorakit train: {'DPO' if ns.dpo else 'SFT'} {args.method} r={args.r} on {args.model}, {data}, "
          f"{args.max_steps} steps → {args.output_dir}")
    print(_summary(recipe(args)))
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from .train import SFTArgs, run_sft
    from .train.args import parse_overrides

    # The demo's validation loss uses 48 of the 200 held-out rows (a forward over all of them costs ~20 s on 2 cores);
    # accuracy is measured on all 200.
    # Each demo replaces the previous demo's output (overwrite), unless asked to resume it.
    overrides = {"task": "dates", "output_dir": ns.output_dir, "val_loss_rows": 48, "eval_every": 10,
                 **parse_overrides(SFTArgs, ns.set)}
    overrides.setdefault("overwrite", not overrides.get("resume", False))
    if ns.steps is not None:
        overrides["max_steps"] = ns.steps
    args = SFTArgs(**overrides)
    print(f"lorakit demo: {args.method} r={args.r} on {args.model}, task {args.task!r}, {args.max_steps} steps")
    print(_summary(run_sft(args)))
    return 0


def _summary(result) -> str:
    """The table ``train`` and ``demo`` print from a ``TrainResult``."""
    rows = []
    base, tuned = getattr(result, "base_accuracy", None), getattr(result, "tuned_accuracy", None)
    if base is not None or tuned is not None:
        rows.append(("base accuracy", _pct(base)))
        rows.append(("tuned accuracy", _pct(tuned)))
    if getattr(result, "best_val_loss", None) is not None:
        rows.append(("best val loss", f"{result.best_val_loss:.4f}"))
    rows.append(("time", f"{result.seconds:.1f} s for {result.steps} steps"))
    t = result.trainable
    rows.append(("trainable", f"{t.trainable:,} of {t.total:,} parameters ({t.percent:.2f}%)"))
    rows.append(("adapter", str(result.adapter_dir)))
    rows.append(("plot", str(result.plot_path) if result.plot_path else "-"))
    rows.append(("metrics", str(result.metrics_path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _quiet_loading() -> None:
    # transformers draws a "Loading weights" bar on stderr; a command's stderr is kept for its one error line.
    from transformers.utils import logging

    logging.disable_progress_bar()


def _load(ns: argparse.Namespace):
    """Base model + the ``--adapter`` directories, with ``--active`` set; returns ``(model, tokenizer)``."""
    import lorakit

    _quiet_loading()
    with warnings.catch_warnings(record=True) as caught:  # a missing tokenizer is this command's one error line
        warnings.simplefilter("always")
        model, tokenizer = lorakit.load_model(ns.model, quantization=getattr(ns, "quantization", None))
    if tokenizer is None:
        raise ValueError(f"{ns.model} holds no tokenizer, which this command needs; save one there with "
                         "tokenizer.save_pretrained")
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    dirs = ns.adapter or []
    names = ns.adapter_name or (["default"] if len(dirs) == 1 else
                                [re.sub(r"[^A-Za-z0-9_-]", "_", Path(d).resolve().name) for d in dirs])
    if len(names) != len(dirs) or len(set(names)) != len(names):
        raise ValueError(f"{len(dirs)} --adapter and {len(ns.adapter_name or [])} --adapter-name given; "
                         "give one distinct --adapter-name per --adapter")
    for directory, name in zip(dirs, names):
        lorakit.load_adapter(model, directory, adapter_name=name)
    if getattr(ns, "active", None):
        lorakit.set_adapter(model, [] if ns.active == "none" else ns.active.split(","))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lorakit.accelerate(model)  # the CPU backend's kernels for this machine (See lorakit/cpu/accelerate.py)
    return model.eval(), tokenizer


def _prompt_format(ns: argparse.Namespace, tokenizer, rows: list[dict] | None = None):
    """The prompt format for this command: ``--raw`` / ``--chat``, else the one recorded in the (first active)
    adapter directory, else the rows' own (``--data``), else the chat template when the tokenizer has one."""
    from .data.prompt_format import PromptFormat, choose_prompt_format, load_prompt_format

    dirs, names = ns.adapter or [], ns.adapter_name or []
    active = ns.active.split(",") if getattr(ns, "active", None) else None
    if dirs and active != ["none"]:
        if active and names:
            dirs = [d for d, n in zip(dirs, names) if n in active] or dirs
    recorded = load_prompt_format(dirs[0]) if dirs and active != ["none"] else None
    system = getattr(ns, "system", None)
    if ns.raw:
        if system is not None:
            raise ValueError("--system needs the chat template; drop --raw or --system")
        return PromptFormat("raw")
    if ns.chat or (system is not None and recorded is None and rows is None):
        return PromptFormat("chat", system if system is not None else (recorded.system if recorded else None))
    if recorded is not None:
        if system is not None:
            if recorded.format == "raw":
                raise ValueError(f"{dirs[0]} was trained on raw prompts (no chat template, no system message); "
                                 "pass --chat with --system to use the template anyway")
            return PromptFormat("chat", system)
        return recorded
    if rows is not None:
        return choose_prompt_format(rows, "auto", system)
    return PromptFormat("chat" if getattr(tokenizer, "chat_template", None) else "raw")


def _columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [item.partition("=") for item in text.split(",")]
    if any(not sep or not k.strip() or not v.strip() for k, sep, v in pairs):
        raise ValueError(f"--columns {text!r}: write lorakit_key=your_column pairs, e.g. prompt=query,completion=label")
    return {k.strip(): v.strip() for k, _, v in pairs}


def _generate(ns: argparse.Namespace) -> int:
    from .data.prompt_format import render_prompt
    from .evaluate import generate_answers

    model, tokenizer = _load(ns)
    fmt = _prompt_format(ns, tokenizer)
    print(generate_answers(model, tokenizer, [render_prompt(ns.prompt, fmt)], max_new_tokens=ns.max_new_tokens)[0])
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from .data.prompt_format import render_prompt
    from .evaluate import generate_answers

    model, tokenizer = _load(ns)
    fmt = _prompt_format(ns, tokenizer)
    history: list[dict] = []  # raw prompts keep no history: each line is a prompt of its own
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"prompts: {fmt.describe()}; type a message; /reset clears the conversation, Ctrl-D quits",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if text == "/reset":
            history = []
        if text in ("", "/reset"):
            continue
        if fmt.format == "raw":
            prompt = text
        else:
            history.append({"role": "user", "content": text})
            prompt = render_prompt(history, fmt)
        reply = generate_answers(model, tokenizer, [prompt], max_new_tokens=ns.max_new_tokens)[0]
        if fmt.format == "chat":
            history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def _eval(ns: argparse.Namespace) -> int:
    import torch

    from .data import load_rows
    from .data.prompt_format import apply_prompt_format
    from .evaluate import validation_loss
    from .scoring import format_failures, score_rows, scorable_rows, write_predictions
    from .tasks import get_metric, get_task, make_split

    metric = get_metric(ns.metric) if ns.metric else None  # a typo fails here, before the model loads
    if ns.data:
        loaded = load_rows(ns.data, formats=("prompt_completion", "messages", "text"), columns=_columns(ns.columns))
        rows = loaded.rows[: ns.n] if ns.n is not None else loaded.rows
        source = f"{ns.data} ({loaded.format} rows)"
        metric = metric or get_metric("exact")
    else:
        task = get_task(ns.task)  # a typo fails here, before the model loads
        rows = make_split(task, 0, 200 if ns.n is None else ns.n, seed=ns.seed)[1]
        source, metric = f"task {task.name!r} (held-out split, seed {ns.seed}; --data FILE for your own rows)", \
            metric or task.score
    if not rows:
        raise ValueError(f"no rows to evaluate in {source}; check the file or raise --n")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    model, tokenizer = _load(ns)
    fmt = _prompt_format(ns, tokenizer, rows if ns.data else None)
    if ns.data:
        rows = apply_prompt_format(rows, fmt)
    print(f"evaluating {ns.model}" + (f" + {', '.join(ns.adapter)}" if ns.adapter else "") + f" on {len(rows)} rows "
          f"of {source}" + (f"; prompts: {fmt.describe()}" if ns.data else ""))
    if scorable_rows(rows):
        scored = score_rows(model, tokenizer, rows, metric, batch_size=ns.batch_size,
                            max_new_tokens=ns.max_new_tokens)
        label = "exact-match accuracy" if ns.metric in (None, "exact") else f"score ({ns.metric})"
        print(f"{label.ljust(21)} {100 * scored.score:.1f}% ({scored.n_correct}/{len(scored.predictions)})")
        if ns.predictions:
            print(f"predictions           {write_predictions(ns.predictions, scored)}")
        failures = format_failures(scored, ns.show_failures)
        if failures and ns.show_failures:
            print(failures)
    elif ns.predictions:
        raise ValueError(f"--predictions: {source} has no answers to predict (text rows)")
    if not ns.no_val_loss:
        print(f"validation loss       {validation_loss(model, tokenizer, rows, ns.max_length, ns.batch_size):.4f}")
    return 0


def _init(ns: argparse.Namespace) -> int:
    from .starter import write_starter_config

    path = write_starter_config(ns.data, ns.output, method=ns.method, model=ns.model, force=ns.force)
    with open(path, encoding="utf-8") as f:
        print(f.readline().removeprefix("# ").rstrip())
    print(f"wrote {path}; next: lorakit train {path}")
    return 0


def _merge(ns: argparse.Namespace) -> int:
    from .config import LoraConfig
    from .merge_plan import resolve_base
    from .streamed_merge import MergeCheckError, check_output_path, merge_to_disk

    base_dir = resolve_base(ns.model)
    weights = ns.weight or [1.0] * len(ns.adapter)
    if len(weights) != len(ns.adapter):
        raise ValueError(f"{len(ns.adapter)} --adapter and {len(weights)} --weight given; give one --weight per "
                         "--adapter, in order (or none: every weight 1)")
    for adapter in ns.adapter:
        LoraConfig.load(adapter)  # a missing or unreadable adapter is named before anything else
    protected = [("base model", base_dir)] + [("adapter", Path(a)) for a in ns.adapter]
    output = check_output_path(ns.output, protected, ns.overwrite)
    if ns.verify != "logits" and any(base_dir.glob("*.safetensors")):
        try:
            result = merge_to_disk(base_dir, list(zip(ns.adapter, weights)), output, ns.dtype,
                                   verify=ns.verify == "probe", overwrite=ns.overwrite, requantize=ns.requantize,
                                   max_shard_size=_size(ns.max_shard_size) if ns.max_shard_size else None)
        except MergeCheckError as err:
            print(f"lorakit: error: {_one_line(err)}", file=sys.stderr)
            return 1
        print(result)
        return 0
    return _merge_in_memory(ns, base_dir, output, weights)


def _merge_in_memory(ns: argparse.Namespace, base_dir: Path, output: Path, weights: list[float]) -> int:
    """``--verify logits``: load base + adapter, merge a copy, compare the logits, save (atomically)."""
    import copy
    import os

    import torch

    import lorakit
    from .atomic import atomic_dir
    from .data import encode_prompt
    from .estimate import read_config

    if len(ns.adapter) != 1 or weights != [1.0]:
        raise ValueError("--verify logits merges one adapter with weight 1; merge several (or weighted) adapters "
                         "with the default streamed merge (--verify probe)")
    base_config = read_config(base_dir)
    trained = base_config.get("dtype") or base_config.get("torch_dtype")
    dtype_name = ns.dtype or (trained if trained in _DTYPES else "float32")
    _quiet_loading()
    model, tokenizer = lorakit.load_model(base_dir, dtype=torch.float32)  # merge in float32, cast when saving
    lorakit.load_adapter(model, ns.adapter[0])
    model.eval()
    merged = lorakit.merge_and_unload(copy.deepcopy(model), safe_merge=True)
    prompts = [encode_prompt([{"role": "user", "content": p}] if tokenizer.chat_template else p, tokenizer)
               for p in _MERGE_PROMPTS]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    report = lorakit.verify_merge(model, merged, {"input_ids": ids, "attention_mask": mask}, tolerance=ns.tolerance)
    print(report)
    if not report.ok:
        print(f"lorakit: error: merged model differs from base + adapter beyond tolerance "
              f"({report.max_abs_diff:.3e} > {report.tolerance:.1e}); nothing written to {ns.output}", file=sys.stderr)
        return 1
    mode = 0o666 & ~_umask()
    with atomic_dir(output) as tmp:
        lorakit.save_merged(merged, tmp, tokenizer, getattr(torch, dtype_name))
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, mode)  # save_pretrained writes some files 0600; the output gets one mode
    print(f"merged model ({dtype_name}) written to {ns.output}")
    return 0


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2000000"`` → bytes (decimal units, as transformers' max_shard_size)."""
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")


def _combine(ns: argparse.Namespace) -> int:
    import torch

    import lorakit
    from .weighted import COMBINATION_TYPES

    weights = ns.weights if ns.weights else [1.0] * len(ns.adapters)
    if len(weights) != len(ns.adapters):
        raise ValueError(f"--weights has {len(weights)} values for {len(ns.adapters)} adapters; give one per adapter")
    if ns.type not in COMBINATION_TYPES:
        raise ValueError(f"--type {ns.type!r}; use one of {', '.join(COMBINATION_TYPES)}")
    out = Path(ns.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--output {out} exists and is not empty; pick a new directory")
    _quiet_loading()
    model, _ = lorakit.load_model(ns.model)
    names = [f"source{i}" for i in range(len(ns.adapters))]
    for name, path in zip(names, ns.adapters):
        lorakit.load_adapter(model, path, adapter_name=name)
    generator = torch.Generator().manual_seed(ns.seed)
    lorakit.add_weighted_adapter(model, names, weights, "combined", combination_type=ns.type, svd_rank=ns.svd_rank,
                                 density=ns.density, majority_sign_method=ns.majority_sign, generator=generator)
    lorakit.save_adapter(model, out, adapter_name="combined")
    config = lorakit.adapter_configs(model)["combined"]
    print(f"combined {len(names)} adapters ({ns.type}, weights {weights}) into rank {config.r}: {out}")
    return 0


def _export(ns: argparse.Namespace) -> int:
    from .gguf_export import export_gguf, export_gguf_adapter

    adapters = ns.adapter or []
    weights = ns.weight or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} --adapter and {len(weights)} --weight given; give one --weight per "
                         "--adapter, in order")
    if ns.adapter_only:
        if len(adapters) != 1 or ns.weight:
            raise ValueError("--adapter-only writes one adapter as a GGUF LoRA adapter; give exactly one --adapter "
                             "and no --weight")
        result = export_gguf_adapter(adapters[0], ns.output, base=ns.model, outtype=ns.outtype or "f32",
                                     overwrite=ns.overwrite)
    else:
        result = export_gguf(ns.model, ns.output, list(zip(adapters, weights)), ns.outtype or "f16",
                             verify=ns.verify == "probe", overwrite=ns.overwrite, tokenizer_pre=ns.tokenizer_pre)
    print(result)
    return 0


def _sweep(ns: argparse.Namespace) -> int:
    from . import train
    from .sweep import format_table, sweep

    try:
        ranks = [int(r) for r in ns.ranks.split(",") if r.strip()] if ns.ranks else []
    except ValueError:
        raise ValueError(f"--ranks {ns.ranks!r}: give comma-separated integers, e.g. 4,8,16,64") from None
    args = train.load_args(train.SFTArgs, ns.config, ns.set)
    out = ns.output_dir or f"{args.output_dir}-sweep"
    runs = ", ".join([f"r={r}" for r in ranks] + (["full"] if ns.full_baseline else []))
    print(f"lorakit sweep: {runs} on {args.model}, {args.train_file or f'task {args.task!r}'}, {args.max_steps} "
          f"steps each → {out}")
    rows = sweep(args, ranks, full_baseline=ns.full_baseline, full_lr=ns.full_lr, output_dir=out)
    print(format_table(rows))
    print(f"table {out}/sweep.md, plot {out}/sweep.png")
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    import json

    from .inspect import check_fit, format_inspection, inspect_adapter

    from .deploy_preview import deploy_preview, format_preview, serving_support

    info = inspect_adapter(ns.adapter_dir)
    problems = check_fit(ns.adapter_dir, ns.model) if ns.model else None
    serving = serving_support(ns.adapter_dir)
    preview = None
    if ns.plan and not problems:  # the preview reads the base's headers: what `merge` / `export` would write
        base = ns.model or info["base_model"]
        if not base:
            raise ValueError(f"--plan needs the base: pass --model (the adapter config names none)")
        preview = deploy_preview(ns.adapter_dir, base, dtype=ns.dtype,
                                 outtype=(ns.outtype or "f16") if ns.plan == "gguf" else None)
    if ns.json:
        print(json.dumps(dict(info, fits=None if problems is None else not problems, problems=problems,
                              serving=serving, plan=preview), indent=2))
    else:
        print(format_inspection(info, problems, ns.model))
        print(format_preview(preview, serving))
    return 1 if problems else 0


def _estimate(ns: argparse.Namespace) -> int:
    import json

    from .estimate import estimate_training, read_config

    targets = [t.strip() for t in ns.targets.split(",")] if ns.targets else None
    name = Path(ns.model).parent.name if Path(ns.model).is_file() else Path(ns.model).name
    result = estimate_training(read_config(ns.model), r=ns.r, targets=targets, batch=ns.batch, seq=ns.seq,
                               dtype=ns.dtype, gradient_checkpointing=ns.gradient_checkpointing, lean=ns.lean,
                               budget_gb=ns.budget_gb, name=name)
    print(json.dumps(result.to_dict(), indent=2) if ns.json else result)
    return 0


# --- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``lorakit`` parser (each subcommand's ``func`` is set as a default)."""
    from . import EMBEDDED_NAME, __version__
    from .scoring import GENERATION

    parser = _Parser(prog="lorakit", description="LoRA / QLoRA fine-tuning of causal language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # Subcommands accept --debug too; SUPPRESS keeps them from resetting a --debug given before the command.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[debug])
        p.set_defaults(func=func)
        return p

    def model_options(p: argparse.ArgumentParser, adapters: bool = True) -> None:
        p.add_argument("--model", default=EMBEDDED_NAME, help=f"base model directory (default: {EMBEDDED_NAME})")
        if adapters:
            p.add_argument("--adapter", action="append", metavar="DIR", help="adapter directory (repeatable)")
            p.add_argument("--adapter-name", action="append", metavar="NAME",
                           help="name for each --adapter, in order (default: 'default', or the directory names)")
            p.add_argument("--active", metavar="NAME[,NAME]", help="adapters to use (default: the first); 'none' "
                           "for the base alone")
            p.add_argument("--quantization", choices=("nf4", "fp4", "int8"), help="quantize the base while loading")

    def prompt_options(p: argparse.ArgumentParser) -> None:
        how = p.add_mutually_exclusive_group()
        how.add_argument("--raw", action="store_true", help="send prompts as plain text, no chat template")
        how.add_argument("--chat", action="store_true", help="render prompts with the tokenizer's chat template")
        p.add_argument("--system", help="system message (chat template)")
        p.epilog = ("Prompts follow the format recorded in the adapter directory (lorakit_prompt.json, written by "
                    "lorakit train); --raw / --chat override it.")

    p = command("train", _train, "fine-tune from a YAML config (keys = SFTArgs / DPOArgs fields)")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="config file, or the name of a built-in config "
                   "(sft_lora, sft_qlora, sft_olora, dpo_lora); default: SFTArgs' defaults")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--dpo", action="store_true", help="preference tuning (DPOArgs, train_dpo)")

    p = command("init", _init, "write an annotated starter config for your data file (checked first)")
    p.add_argument("data", metavar="DATA", help="your rows: JSONL, JSON, CSV or Parquet")
    p.add_argument("--output", "-o", default="lorakit.yaml", help="config to write (default: lorakit.yaml)")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora", help="starting point (default: lora)")
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")

    p = command("demo", _demo, "LoRA on the date task with the embedded model: accuracy before and after")
    p.add_argument("--steps", type=_at_least_one, help="optimizer steps (default: SFTArgs.max_steps)")
    p.add_argument("--output-dir", default="runs/demo", help="where the adapter and plot go (default: runs/demo)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="other SFTArgs")

    p = command("eval", _eval, "exact-match accuracy and validation loss of a model (+ adapter)")
    model_options(p)
    data = p.add_mutually_exclusive_group()
    data.add_argument("--task", default="dates", help="built-in task (default: dates)")
    data.add_argument("--data", metavar="FILE", help="your rows instead of a task: JSONL, JSON, CSV or Parquet, in any "
                      "layout lorakit trains on")
    p.add_argument("--columns", metavar="KEY=COLUMN[,KEY=COLUMN]",
                   help="your file's column names, as the columns: mapping of a config (e.g. prompt=query,"
                        "completion=label)")
    p.add_argument("--n", type=_at_least_one, help="rows to evaluate (default: every row of --data; 200 of a task, as "
                   "SFTArgs.n_eval)")
    p.add_argument("--seed", type=int, default=0, help="task split seed (default: 0, as training)")
    p.add_argument("--metric", help="exact (default), contains, normalized, or module:function")
    p.add_argument("--predictions", metavar="OUT.jsonl", help="write prompt, target, prediction, correct per row")
    p.add_argument("--show-failures", type=int, default=3, metavar="N", help="wrong answers to print (default 3)")
    p.add_argument("--no-val-loss", action="store_true", help="skip the validation loss")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=GENERATION["batch_size"], help="rows per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=GENERATION["max_new_tokens"])
    p.add_argument("--max-length", type=int, default=256, help="tokens per row for the loss")
    prompt_options(p)

    for name, func, help in (("generate", _generate, "greedy reply to one prompt (in the adapter's prompt format)"),
                             ("chat", _chat, "chat on stdin: one user turn per line until EOF")):
        p = command(name, func, help)
        model_options(p)
        if name == "generate":
            p.add_argument("prompt", metavar="PROMPT")
        p.add_argument("--max-new-tokens", type=int, default=128)
        prompt_options(p)

    p = command("merge", _merge, "merge adapters into their base and save the merged model (streamed, verified)")
    model_options(p, adapters=False)
    p.add_argument("--adapter", required=True, action="append", metavar="DIR", help="adapter directory (repeatable)")
    p.add_argument("--weight", action="append", type=float, metavar="W",
                   help="weight of each --adapter's update, in order (default: 1 each)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=_DTYPES, help="saved dtype (default: the base's config.json dtype; bfloat16 "
                   "for a 4-bit base)")
    p.add_argument("--verify", choices=("probe", "logits", "none"), default="probe",
                   help="probe: streamed merge, every merged weight checked on random vectors (default); logits: "
                   "load the whole model, compare base + adapter with the merged model's logits; none: no check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output as a whole")
    p.add_argument("--requantize", action="store_true", help="4-bit base: write the merged weights 4-bit again "
                   "(the base's settings; lossy, the rounding is reported)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="e.g. 2GB (default: the base's own shard layout)")
    p.add_argument("--tolerance", type=float, help="--verify logits: largest accepted |logit difference| (default: "
                   "2e-5 × max |logit|, at least 1e-4)")

    p = command("combine", _combine, "a new adapter from weighted adapters (PEFT's add_weighted_adapter)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the combined adapter (new or empty)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per adapter (default: all 1)")
    p.add_argument("--type", default="svd", metavar="TYPE",
                   help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, or an *_svd variant "
                        "(default: svd, exact up to its rank; cat is exact at rank Σ r)")
    p.add_argument("--density", type=float, help="fraction of entries kept by ties / dare_* / magnitude_prune")
    p.add_argument("--svd-rank", type=int, help="rank of an svd result (default: the largest source rank)")
    p.add_argument("--majority-sign", choices=("total", "frequency"), default="total", help="TIES sign election")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default: 0)")
    p.add_argument("--model", default=EMBEDDED_NAME, help=f"base model the adapters were trained on (default: "
                                                          f"{EMBEDDED_NAME})")

    p = command("export", _export, "write base + adapters (merged, streamed) or an adapter alone as a GGUF file "
                "for llama.cpp / Ollama")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="output format (gguf)")
    p.add_argument("--model", default=EMBEDDED_NAME, help=f"base model directory (default: {EMBEDDED_NAME})")
    p.add_argument("--adapter", action="append", metavar="DIR", help="adapter to merge (repeatable; none: the base)")
    p.add_argument("--weight", action="append", type=float, metavar="W", help="weight of each --adapter, in order")
    p.add_argument("--output", required=True, metavar="FILE.gguf")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"),
                   help="type of the 2-D weights (default: f16; f32 for --adapter-only); norms stay f32")
    p.add_argument("--adapter-only", action="store_true", help="write the one --adapter as a GGUF LoRA adapter "
                   "(llama.cpp --lora, Ollama ADAPTER); --model gives the base's config.json")
    p.add_argument("--verify", choices=("probe", "none"), default="probe", help="probe-check each merged weight")
    p.add_argument("--tokenizer-pre", metavar="NAME", help="llama.cpp pre-tokenizer name (default: 'smollm' for the "
                   "embedded model, else 'default')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = command("sweep", _sweep, "train one config at several LoRA ranks (and in full): one table and one plot")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="SFT config (default: built-in defaults)")
    p.add_argument("--ranks", default="4,8,16,64", metavar="R[,R]",
                   help="ranks to train (default 4,8,16,64: start at 4-8, 16 usually suffices for one task or "
                        "domain, 64 for several; keep the smallest whose validation loss is as low as the larger)")
    p.add_argument("--full-baseline", action="store_true",
                   help="also fine-tune every weight, to see how close the adapters get")
    p.add_argument("--full-lr", type=float, default=2e-5, help="learning rate of the full baseline (default 2e-5)")
    p.add_argument("--output-dir", metavar="DIR", help="runs, sweep.md and sweep.png (default: <output_dir>-sweep)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")

    p = command("inspect", _inspect, "what an adapter directory holds; with --model, whether it fits that base")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    p.add_argument("--model", help="base model directory, config.json or the embedded model's name")
    p.add_argument("--plan", choices=("merge", "gguf"), help="also show what `lorakit merge` / `lorakit export "
                   "--format gguf` would write (tensors touched, size, dtype, peak memory), without writing")
    p.add_argument("--dtype", choices=_DTYPES, help="--plan merge: output dtype (default: the base's)")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), help="--plan gguf: output type (default f16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("estimate", _estimate, "trainable parameters and memory of full / LoRA / QLoRA from config.json")
    p.add_argument("--model", default=EMBEDDED_NAME, help="model directory, config.json or the embedded name")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--targets", metavar="NAME[,NAME]", help="adapted layers (default: all linear layers)")
    p.add_argument("--budget-gb", type=float, help="memory budget in GiB: which methods fit")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size (default: 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per example (default: 256)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="weights/activations dtype (default float32)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lean", action="store_true",
                   help="activations of lorakit's own training loop (recomputed norms/SwiGLU, chunked head loss)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    parser.commands = sub.choices  # {name: subparser}, for the suggestions of _check_command / _check_extras
    return parser


def _check_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Name the closest subcommand for a typo (argparse would list all choices without a suggestion)."""
    word = next((a for a in argv if not a.startswith("-")), None)  # the top level has no option taking a value
    if word is not None and word not in parser.commands:
        close = difflib.get_close_matches(word, parser.commands, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise _UsageError(f"unknown command {word!r}; {hint}commands: {', '.join(parser.commands)}")


def _check_extras(parser: argparse.ArgumentParser, ns: argparse.Namespace, extras: list[str]) -> None:
    """Name the closest option for an unrecognized one."""
    options = [o for a in parser.commands[ns.command]._actions for o in a.option_strings]
    flag = next((e for e in extras if e.startswith("-")), None)
    if flag is None:
        raise _UsageError(f"unexpected argument {extras[0]!r} (see 'lorakit {ns.command} --help')")
    close = difflib.get_close_matches(flag.split("=")[0], options, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(sorted(options))}"
    raise _UsageError(f"unknown option {flag!r} for 'lorakit {ns.command}'{hint}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a check failed, 2 a usage or input error)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        _check_command(parser, argv)
        ns, extras = parser.parse_known_args(argv)
        if ns.command is None:
            parser.print_help()
            return 0
        if extras:
            _check_extras(parser, ns, extras)
    except _UsageError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help / --version
        return int(done.code or 0)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, yaml.YAMLError) as err:
        if ns.debug:
            raise
        print(f"lorakit: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


def _one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    return " ".join(str(err).split())  # YAML errors span several lines
