"""The `mos-jax` command.

    mos-jax demo [--workdir runs/demo]
    mos-jax train --config configs/ptb.py [--workdir DIR] [--config.KEY=VALUE ...]
    mos-jax train --workdir DIR                      (continue a run)
    mos-jax finetune --config configs/ptb_finetune.py --workdir DIR
    mos-jax evaluate --workdir DIR | --weights DIR [--data CORPUS] [--split test]
                     [--batch-size 1] [--bptt 70] [--dump FILE.npy]
    mos-jax plot --workdir DIR [--workdir DIR ...] [--out curves.png]
    mos-jax download ptb|wikitext-2 --dest DIR
    mos-jax import-torch FILE.pt --out DIR [--head mos|moc|softmax]

A user mistake (missing file, bad key, ...) prints one line starting with `error:` and
exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mos_jax.errors import MosJaxError


def _cmd_download(args) -> None:
    from mos_jax.download import download_corpus
    dest = download_corpus(args.corpus, args.dest, timeout=args.timeout)
    print(f"{args.corpus} is ready in {dest}")


def _cmd_import_torch(args) -> None:
    from mos_jax import convert, model
    config, params = convert.import_torch(args.file, args.out, head=args.head)
    print(f"imported {model.param_count(params):,} parameters ({config.head} head, "
          f"V={config.vocab_size}, emsize={config.emsize}, nhid={config.nhid}, "
          f"nhidlast={config.nhidlast}, experts={config.n_experts}) into {args.out}")


class _Progress:
    """A one-line progress report on stderr: rows done, tokens/s."""

    def __init__(self, label: str, batch_size: int):
        self.label, self.batch_size, self.start = label, batch_size, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        rate = done * self.batch_size / max(time.perf_counter() - self.start, 1e-9)
        end = "\n" if done == total else ""
        print(f"\r{self.label}: {done}/{total} rows, {rate:,.0f} tokens/s",
              end=end, file=sys.stderr, flush=True)


def _run_config(args):
    """The config of a train/finetune call: a file, or the work directory's own."""
    from mos_jax import config as config_lib
    overrides = config_lib.parse_overrides(args.overrides)
    if args.config is not None:
        config = config_lib.load_config(args.config, overrides)
        workdir = args.workdir or Path("runs") / Path(args.config).stem
        return config, workdir
    if args.workdir is not None and (Path(args.workdir) / "config.json").is_file():
        from mos_jax import train
        config = train.load_run_config(args.workdir)
        return config_lib.apply_overrides(config, overrides), args.workdir
    raise MosJaxError("give --config FILE (e.g. configs/ptb.py), or --workdir of a run "
                      "to continue")


def _cmd_train(args) -> None:
    from mos_jax import train
    config, workdir = _run_config(args)
    run = train.finetune if args.command == "finetune" else train.train_and_evaluate
    print(json.dumps(run(config, workdir)))


def _cmd_evaluate(args) -> None:
    import math

    import numpy as np

    from mos_jax import convert, data, evaluate
    if (args.weights is None) == (args.workdir is None):
        raise MosJaxError("give exactly one of --workdir (a training run) or --weights "
                          "(a directory written by import-torch)")
    if args.workdir is not None:
        from mos_jax import train
        run_config, corpus, config, params = train.load_best(args.workdir)
        if args.data is not None:
            corpus = data.load_corpus(args.data)
    else:
        if args.data is None:
            raise MosJaxError("--weights needs --data: the corpus to evaluate on")
        config, params = convert.load_weights(args.weights)
        corpus = data.load_corpus(args.data)
    if corpus.vocab_size != config.vocab_size:
        raise MosJaxError(
            f"the weights have a {config.vocab_size:,}-word vocabulary but {args.data} "
            f"has {corpus.vocab_size:,} words: evaluate on the corpus the model was "
            "trained on")
    ids = corpus.split(args.split)
    logp = evaluate.token_logprobs(config, params, ids, args.batch_size, args.bptt,
                                   progress=_Progress(f"{args.split}", args.batch_size))
    nll = -float(np.mean(logp, dtype=np.float64))
    result = {"split": args.split, "tokens": int(logp.size), "nll": nll,
              "ppl": math.exp(nll), "batch_size": args.batch_size, "bptt": args.bptt}
    if args.dump:
        np.save(args.dump, logp)
        result["dump"] = str(args.dump)
    print(json.dumps(result))


def _cmd_plot(args) -> None:
    from mos_jax.plot import plot_learning_curves
    runs = {Path(w).name or str(w): w for w in args.workdir}
    out = plot_learning_curves(runs, args.out)
    print(f"wrote {out}")


def _cmd_demo(args) -> None:
    from mos_jax.demo import run_demo
    run_demo(args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mos-jax", description="AWD-LSTM with a Mixture-of-Softmaxes head, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch PTB or WikiText-2 and verify checksums")
    p.add_argument("corpus", choices=["ptb", "wikitext-2"])
    p.add_argument("--dest", required=True, type=Path, help="directory for the files")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("import-torch", help="convert a reference PyTorch checkpoint")
    p.add_argument("file", type=Path, help="a .pt file: state dict or pickled model")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--head", choices=["mos", "moc", "softmax"], default=None,
                   help="head to read the weights as (default: from the weights)")
    p.set_defaults(func=_cmd_import_torch)

    p = sub.add_parser("evaluate", help="perplexity of a run's best weights or of "
                       "imported weights on a split")
    p.add_argument("--workdir", type=Path, help="a training run's work directory")
    p.add_argument("--weights", type=Path, help="a directory written by import-torch")
    p.add_argument("--data", default=None, help="corpus directory, 'synthetic', or "
                   "'tfds:NAME' (default with --workdir: the run's corpus)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--bptt", type=int, default=70)
    p.add_argument("--dump", type=Path, help="save per-token log-probs [rows, batch] as .npy")
    p.set_defaults(func=_cmd_evaluate)

    for name, text in (("train", "train a model (or continue the run in --workdir)"),
                       ("finetune", "the finetune stage from a run's best weights")):
        p = sub.add_parser(name, help=text,
                           epilog="Any config key can be overridden: --config.optim.lr=10")
        p.add_argument("--config", type=Path, help="a config file, e.g. configs/ptb.py")
        p.add_argument("--workdir", type=Path,
                       help="where checkpoints and metrics go (default runs/CONFIG_NAME)")
        p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plot", help="learning curves of runs to a PNG")
    p.add_argument("--workdir", type=Path, action="append", required=True,
                   help="a run's work directory (repeat to compare runs)")
    p.add_argument("--out", type=Path, default=Path("learning_curves.png"))
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("demo", help="softmax vs MoS on the built-in high-rank corpus")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    if rest and args.command not in ("train", "finetune"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.func(args)
    except MosJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
