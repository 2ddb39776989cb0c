"""The `mos-jax` command.

    mos-jax demo [--workdir runs/demo]
    mos-jax study [--config FILE] [--transformer-config FILE] [--heads softmax,mos]
                  [--widths 8,16,32,64] [--encoders lstm,transformer] [--steps N]
                  [--evals E] [--workdir runs/study] [--config.KEY=VALUE ...]
    mos-jax study --config FILE --vocab-sizes 2000,8000 [--widths D] [--heads ...]
    mos-jax compare-heads --config FILE --heads softmax,mos,... [--workdir DIR]
                          [--steps N | --time-budget S] [--config.KEY=VALUE ...]
    mos-jax train --config configs/ptb.py [--workdir DIR] [--config.KEY=VALUE ...]
    mos-jax train --workdir DIR                      (continue a run)
    mos-jax finetune --config configs/ptb_finetune.py --workdir DIR
    mos-jax config --config FILE [--config.KEY=VALUE ...] | --workdir DIR | --reference
    mos-jax evaluate --workdir DIR | --weights DIR [--data CORPUS] [--split test]
                     [--text FILE]
                     [--batch-size 1] [--bptt 70] [--dump FILE.npy] [--out FILE]
                     [--by-frequency [--top-words 100] [--count-edges 1000,100,10]]
    mos-jax dynamic-eval --workdir DIR | --weights DIR [--preset ptb] [--lr --lamb ...]
    mos-jax rank --workdir DIR | --weights DIR --data CORPUS [--split valid]
                 [--contexts N] [--max-memory-gb 4] [--plot FILE.png] [--out FILE]
    mos-jax generate --workdir DIR | --weights DIR --data CORPUS [--prompt "words ..."]
                     [--words 100] [--temperature 1.0] [--seed 0] [--out FILE]
                     [--model-shards 1] [--num-devices M]
    mos-jax plot --workdir DIR [--workdir DIR ...] [--out curves.png]
    mos-jax download ptb|wikitext-2 --dest DIR
    mos-jax import FILE.pt|FILE.npz --out DIR [--head HEAD] [--data CORPUS]
                                                     (alias: import-torch)
    mos-jax bench [--config configs/ptb.py] [--batch 12] [--bptt 70] [--dtype float32]
                  [--vocab-chunk auto] [--num-devices 1] [--only train,eval] [--out F]
                  [--vocab N]   (default: the config's corpus's vocabulary)
    mos-jax bench --vocab-sizes 10000,33000,100000 [--heads softmax,mos] [--plot F.png]
                  [--batch B] [--bptt T] [--repeats R] [--out F] [--config.KEY=VALUE ...]
    mos-jax --version

A user mistake (missing file, bad key, ...) prints one line starting with `error:` and
exits with status 2; no traceback. Sizes and output paths are checked before any work
(one rule for every output: `mos_jax.outputs`), so a bad `--dump` or `--plot` never
costs the result of a long run; a write that fails after the work anyway still prints
the result, puts the file in the temporary folder, and ends with that error line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

from mos_jax import __version__, outputs
from mos_jax.errors import MosJaxError, note

# The subcommands that take --config.KEY=VALUE overrides.
OVERRIDE_COMMANDS = ("train", "finetune", "compare-heads", "bench", "study", "config")


def _cmd_download(args) -> None:
    from mos_jax.download import download_corpus
    outputs.check_folder("--dest", args.dest)
    dest = download_corpus(args.corpus, args.dest, timeout=args.timeout)
    print(f"{args.corpus} is ready in {dest}")


def _cmd_sources(args) -> None:
    from mos_jax import download, sources
    print(sources.describe_sources())
    print("\nmos-jax download NAME --dest DIR fills a directory: "
          + ", ".join(sorted(download.CORPORA)))


def _at_least(flag: str, value, low: int = 1) -> None:
    """Refuse a count below `low` (None: the option was not given)."""
    if value is not None and value < low:
        raise MosJaxError(f"{flag} must be at least {low}, got {value}")


def _shards_plan(args, model_config):
    """The plan of --num-devices and --model-shards (evaluate, dynamic-eval, rank,
    generate), checked
    against the model; its refusals name those flags (the placement's own messages
    name the config keys of training, which these commands do not take)."""
    from mos_jax import parallel, train
    from mos_jax.errors import ConfigError
    _at_least("--model-shards", args.model_shards)
    if args.num_devices is None:  # (rank, generate: few columns) one group of M devices
        import jax  # (more than there are: all of them, for the refusal to name M)
        args.num_devices = (args.model_shards if args.model_shards <= jax.local_device_count()
                            else 0)
    try:
        plan = parallel.local_plan(args.num_devices, model=args.model_shards)
        train.check_placement(plan, model_config, trained=True)
    except ConfigError as e:
        text = str(e)
        for key, flag in (("--config.parallel.mesh.model=", "--model-shards "),
                          ("parallel.mesh.model=", "--model-shards "),
                          ("parallel.num_devices", "--num-devices")):
            text = text.replace(key, flag)
        raise ConfigError(text) from None
    return plan


def _positive(flag: str, value, zero_ok: bool = False) -> None:
    """Refuse a non-finite, negative or (unless zero_ok) zero number."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise MosJaxError(f"{flag} must be a {'non-negative' if zero_ok else 'positive'} "
                          f"number, got {value}")


def _image_formats() -> set[str]:
    """File suffixes matplotlib can write (`.png`, `.pdf`, `.svg`, ...)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise MosJaxError("plotting needs matplotlib: pip install matplotlib") from None
    return {f".{k}" for k in FigureCanvasAgg.get_supported_filetypes()}


def _output_file(flag: str, path, suffixes=None) -> None:
    """Refuse, before any work, an output file that cannot be written: the one rule of
    `mos_jax.outputs.check_file`. `suffixes`: the accepted file endings (an image
    format for plots)."""
    outputs.check_file(flag, path, suffixes)


def _cmd_import(args) -> None:
    from mos_jax import convert, data, model, sources
    outputs.check_folder("--out", args.out)
    if args.head is not None:
        convert.import_layout(args.head)  # a head that cannot hold them: before reading
    corpus = sources.corpus_of(args.data) if args.data is not None else None
    config, params = convert.read_weights(args.file, head=args.head)
    if corpus is not None and corpus.vocab_size != config.vocab_size:
        raise MosJaxError(
            f"--data {args.data} has {corpus.vocab_size:,} words but the weights "
            f"{config.vocab_size:,}: name the corpus the weights were trained on "
            "(nothing was written)")
    convert.save_weights(args.out, config, params)
    vocab_note = ""
    if corpus is not None:
        data.save_vocab(args.out, corpus.vocab)  # the reference's ids: first occurrence
        vocab_note = f", vocabulary of {args.data} recorded"
    else:  # no earlier import's vocabulary may stay beside these weights
        (Path(args.out) / data.VOCAB_FILE).unlink(missing_ok=True)
    print(f"imported {model.param_count(params):,} parameters ({config.head} head, "
          f"V={config.vocab_size}, emsize={config.emsize}, nhid={config.nhid}, "
          f"nhidlast={config.nhidlast}, experts={config.n_experts}) into "
          f"{args.out}{vocab_note}")


def _run_config(args):
    """The config of a train/finetune call: a file, or the work directory's own."""
    from mos_jax import config as config_lib
    overrides = config_lib.parse_overrides(args.overrides)
    if args.config is not None:
        config = config_lib.load_config(args.config, overrides)
        switch = config_lib.encoder_switch_note(args.config, config)
        if switch:
            note(switch)
        workdir = args.workdir or Path("runs") / Path(args.config).stem
        return config, workdir
    if args.workdir is not None and (Path(args.workdir) / "config.json").is_file():
        from mos_jax import train
        config = train.load_run_config(args.workdir)
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config, unknown_ok=True)
        return config, args.workdir
    raise MosJaxError("give --config FILE (e.g. configs/ptb.py), or --workdir of a run "
                      "to continue")


def _cmd_config(args) -> None:
    from mos_jax import config as config_lib
    if args.reference:
        if args.config is not None or args.workdir is not None or args.overrides:
            raise MosJaxError("--reference prints every key's declaration; give it alone")
        print(config_lib.reference_markdown(), end="")
        return
    config, _ = _run_config(args)
    print(config_lib.to_json(config))


def _cmd_train(args) -> None:
    from mos_jax import config as config_lib, train
    config, workdir = _run_config(args)
    if args.command == "finetune":
        # The data keys not given here come from the run being finetuned.
        given = [key[len("data."):] for key, _ in config_lib.parse_overrides(args.overrides)
                 if key.startswith("data.")]
        print(json.dumps(train.finetune(config, workdir, data_given=given)))
    else:
        print(json.dumps(train.train_and_evaluate(config, workdir)))


def _subwords(args):
    """The subword tokenizer the weights were trained with (their tokenizer.json), or
    None: a word-level run, whose text is read word by word."""
    from mos_jax import data
    return data.load_subwords(args.workdir or args.weights)


def _load_model(args, splits=()):
    """`(model_config, params, corpus, vocab, unknown)` from --workdir or --weights
    (+ --data).

    `vocab` is the weights' vocabulary: a run's `vocab.json` (or, for runs and imports
    that recorded none, its corpus's order). `corpus` (None unless `splits` name the
    splits the command reads) is the run's corpus or --data's, its words mapped into
    `vocab` by string, never by id: words the vocabulary lacks become `<unk>` (each
    split's count and first words are noted on stderr and returned in `unknown`), or
    are refused in one line when it has no `<unk>`.
    """
    from mos_jax import convert, data
    if (args.weights is None) == (args.workdir is None):
        raise MosJaxError("give exactly one of --workdir (a training run) or --weights "
                          "(a directory written by `mos-jax import`)")
    corpus, unknown = None, []
    if args.workdir is not None:
        from mos_jax import train
        best = train.load_run(args.workdir, corpus=bool(splits) and args.data is None,
                              splits=tuple(splits))
        config, params, vocab = best.model_config, best.params, best.vocab
        run_config = best.config
        corpus, unknown = best.corpus, list(best.unknown)
        if not best.recorded and args.data is not None:
            note(f"note: {args.workdir} records no vocabulary (trained before "
                  f"vocab.json): {args.data}'s word ids are taken as they are")
            vocab = None
    else:
        config, params = convert.load_weights(args.weights)
        vocab, run_config = data.load_vocab(args.weights), None
        if args.data is None and (vocab is None or splits):
            raise MosJaxError("--weights needs --data: the corpus to evaluate on")
    subwords = _subwords(args)
    if subwords is not None and vocab is None:
        where = args.workdir or args.weights
        raise MosJaxError(f"{where} records a subword tokenizer ({subwords.describe()}) "
                          f"but no vocabulary ({data.VOCAB_FILE}), which gives its "
                          "pieces their ids: copy the run's vocab.json beside it")
    if args.data is not None and (splits or vocab is None) and subwords is not None:
        from mos_jax import sources
        if sources.find_source(args.data)[0].name != sources.DIRECTORY:
            raise MosJaxError(f"--data {args.data}: a subword run reads text with its "
                              "tokenizer, from a directory holding train.txt, valid.txt "
                              "and test.txt; give one")
        corpus = data.read_corpus(args.data, vocab=vocab, subwords=subwords)
    elif args.data is not None and (splits or vocab is None):
        from mos_jax import sources  # the run's source options (synthetic, TFDS dirs)
        corpus = sources.corpus_of(args.data, run_config)
        if vocab is None:  # ids as the corpus gives them (no recorded vocabulary)
            vocab = corpus.vocab
        else:
            corpus, unknown = data.map_to_vocab(corpus, vocab, splits)
    if len(vocab) != config.vocab_size:
        raise MosJaxError(
            f"the weights have a {config.vocab_size:,}-word vocabulary but {args.data} "
            f"has {len(vocab):,} words: evaluate on the corpus the model was "
            "trained on")
    for u in unknown:
        note(f"note: {u.describe(vocab, 'are scored as <unk>')}")
    return config, params, corpus, tuple(vocab), unknown


def _cmd_evaluate(args) -> None:
    import numpy as np

    from mos_jax import evaluate
    from mos_jax.progress import counter
    _at_least("--batch-size", args.batch_size)
    _at_least("--bptt", args.bptt)
    _output_file("--dump", args.dump, suffixes={".npy"})
    _output_file("--out", args.out)
    if args.by_frequency:  # a bad --top-words before anything loads
        from mos_jax import frequency
        frequency.check_edges(args.top_words, args.count_edges)
    if args.text is not None:
        if args.split is not None:
            raise MosJaxError("give --text FILE or --split SPLIT, not both: --text "
                              "scores the file instead of a split")
        if not Path(args.text).is_file():
            what = "is a folder, not a file" if Path(args.text).is_dir() else \
                "no such file"
            raise MosJaxError(f"--text {args.text}: {what}; give a UTF-8 text file to "
                              "score")
    args.split = args.split or "test"
    needed = ([] if args.text is not None else [args.split]) + (
        ["train"] if args.by_frequency else [])
    config, params, corpus, vocab, unknown = _load_model(args, needed)
    subwords = _subwords(args)
    if args.text is not None:
        from mos_jax import data
        ids, u = data.encode_text_file(args.text, vocab, subwords)
        if u is not None:
            note(f"note: {u.describe(vocab, 'are scored as <unk>')}")
            unknown.append(u)
        if corpus is not None:  # --by-frequency: the text in place of the test split
            import dataclasses
            corpus = dataclasses.replace(corpus, test=ids)
    else:
        ids = corpus.split(args.split)
    plan = _shards_plan(args, config)
    logp = evaluate.token_logprobs(config, params, ids, args.batch_size, args.bptt,
                                   progress=counter(
                                       "text" if args.text is not None else args.split,
                                       args.batch_size),
                                   plan=plan, log=note)
    nll = -float(np.mean(logp, dtype=np.float64))
    where = {"text": str(args.text)} if args.text is not None else {"split": args.split}
    result = {**where, "tokens": int(logp.size), "nll": nll, "ppl": math.exp(nll),
              "unknown_tokens": sum(u.tokens for u in unknown if u.split == (
                  None if args.text is not None else args.split)),
              "batch_size": args.batch_size, "bptt": args.bptt}
    if subwords is not None:  # per word of the text, beside per piece
        from mos_jax import data
        words = (data.text_words(args.text) if args.text is not None
                 else corpus.words_in(args.split))
        result.update(tokenizer=subwords.describe(), words=words,  # so sizes compare
                      word_perplexity=evaluate.word_perplexity(nll, len(ids), words))
    deliveries = outputs.Deliveries()
    if args.dump:
        result["dump"] = outputs.where(deliveries.array("--dump", args.dump, logp))
    if args.by_frequency:
        from mos_jax import frequency
        rep = frequency.by_frequency(config, params, corpus,
                                     "test" if args.text is not None else args.split,
                                     args.batch_size,
                                     args.bptt, top=args.top_words,
                                     edges=args.count_edges, logp=logp)
        if args.text is not None:
            rep["text"] = str(args.text)
        result["by_frequency"] = {k: rep[k] for k in ("top", "edges", "buckets")}
    if args.out:
        deliveries.text("--out", args.out, json.dumps(result, indent=2) + "\n")
    if args.by_frequency:  # the table on stdout, the numbers in --out
        print(frequency.describe(rep))
        print()
        print("\n".join(frequency.format_table(rep)))
    else:
        print(json.dumps(result))
    deliveries.check()


def _count_edges(text: str) -> tuple[int, ...]:
    """--count-edges: "1000,100,10"; a bad list is an argparse error (exit 2)."""
    from mos_jax import frequency
    try:
        return frequency.parse_edges(text)
    except MosJaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _digest(tree) -> str:
    """The first 16 hex digits of a SHA-256 over the bytes of `tree`'s arrays."""
    import hashlib

    import jax
    import numpy as np
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def _statistics_file(home: Path, params, train_ids, args) -> Path:
    """Where dynamic evaluation caches the gradient statistics of `params` over the
    training ids `train_ids`: named by both digests and every setting that changes them."""
    key = (f"{_digest(params)}-c{_digest(train_ids)[:8]}-b{args.stats_batch_size}"
           f"-t{args.bptt}-m{args.max_batches or 0}-{'rms' if args.rms else 'sum'}")
    return home / "dynamic_eval" / f"stats-{key}.npz"


def _cmd_dynamic_eval(args) -> None:
    from mos_jax import dynamic_eval as de
    from mos_jax.progress import counter
    if args.preset not in de.PRESETS:
        raise MosJaxError(f"--preset {args.preset}: choose one of "
                          f"{', '.join(sorted(de.PRESETS))}")
    for flag in ("batch_size", "bptt", "stats_batch_size", "max_batches"):
        _at_least("--" + flag.replace("_", "-"), getattr(args, flag))
    _positive("--lr", args.lr, zero_ok=True)
    _positive("--lamb", args.lamb)  # decrate is clipped at 1/lamb
    _positive("--epsilon", args.epsilon)
    _output_file("--dump", args.dump, suffixes={".npy"})
    _output_file("--out", args.out)
    config, params, corpus, _, _ = _load_model(args, ("train", args.split))
    plan = _shards_plan(args, config)
    settings = dict(de.PRESETS[args.preset])
    for key in ("lr", "lamb", "epsilon"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cache = _statistics_file(Path(args.workdir or args.weights), params, corpus.train, args)
    start = time.perf_counter()
    if cache.is_file():
        stats = de.load_statistics(cache, params, settings["lamb"])
        print(f"gradient statistics from {cache}", file=sys.stderr)
    else:
        stats = de.gradient_statistics(
            config, params, corpus.train, lamb=settings["lamb"],
            batch_size=args.stats_batch_size, bptt=args.bptt,
            max_batches=args.max_batches, rms=args.rms,
            progress=counter("gradient statistics (windows)",
                             args.stats_batch_size * args.bptt), plan=plan, log=note)
        try:  # a cache: a folder that takes no file costs the next run, not this one
            de.save_statistics(cache, stats)
        except OSError as e:
            note(f"could not cache the gradient statistics in {cache} "
                  f"({e.strerror or e}); they will be computed again next time")
    stats_s = time.perf_counter() - start
    start = time.perf_counter()
    result = de.dynamic_evaluate(
        config, params, stats.ms, stats.decrate, corpus.split(args.split), bptt=args.bptt,
        batch_size=args.batch_size,
        progress=counter(f"dynamic evaluation ({args.split}, windows)",
                         args.batch_size * args.bptt), plan=plan,
        log=note, **settings)
    out = {"split": args.split, "tokens": int(result.token_logprobs.size),
           "nll": result.nll, "ppl": result.perplexity, **settings, "bptt": args.bptt,
           "batch_size": args.batch_size, "stats_windows": stats.windows,
           "stats_cache": str(cache), "stats_seconds": round(stats_s, 2),
           "eval_seconds": round(time.perf_counter() - start, 2)}
    deliveries = outputs.Deliveries()
    if args.dump:
        out["dump"] = outputs.where(deliveries.array("--dump", args.dump,
                                              result.token_logprobs))
    if args.out:
        deliveries.text("--out", args.out, json.dumps(out, indent=2))
    print(json.dumps(out))
    deliveries.check()


def _cmd_rank(args) -> None:
    from mos_jax import rank
    if args.contexts is not None and args.contexts < 1:
        raise MosJaxError(f"--contexts must be at least 1, got {args.contexts}")
    _at_least("--batch-size", args.batch_size)
    _at_least("--bptt", args.bptt)
    plot = args.plot or Path(args.workdir or ".") / "rank_spectrum.png"
    _output_file("--plot", plot, suffixes=_image_formats())
    _output_file("--out", args.out)
    config, params, corpus, _, _ = _load_model(args, (args.split,))
    plan = _shards_plan(args, config)
    result = rank.analyse(config, params, corpus.split(args.split), args.contexts,
                          max_memory_gb=args.max_memory_gb, batch_size=args.batch_size,
                          bptt=args.bptt, log=note, plan=plan)
    s = result.pop("singular_values")
    title = (f"{config.head} head, d={config.output_size}: rank {result['rank']:,} of "
             f"{result['contexts']:,} x {result['vocab_size']:,} ({args.split})")
    deliveries = outputs.Deliveries()
    drawn = deliveries.write("--plot", plot, lambda path: rank.plot_spectrum(
        s, result["threshold"], path, title=title))
    out = {"split": args.split, **result,
           "threshold_rule": "0.5 * sqrt(N + V + 1) * s_max * eps (Numerical Recipes)",
           "batch_size": args.batch_size, "bptt": args.bptt,
           "plot": outputs.where(drawn)}
    if args.out:
        out["out"] = outputs.where(deliveries.text("--out", args.out,
                                                   json.dumps(out, indent=2)))
    print(json.dumps(out))
    deliveries.check()


def _cmd_generate(args) -> None:
    import numpy as np

    from mos_jax import data, generate
    if not args.temperature > 0 or not math.isfinite(args.temperature):
        raise MosJaxError(f"--temperature must be a positive number, got "
                          f"{args.temperature} (1 samples the model's distribution, "
                          "smaller values approach its most likely words)")
    if args.words < 1:
        raise MosJaxError(f"--words must be at least 1, got {args.words}")
    _output_file("--out", args.out)
    prompted = args.prompt is not None and bool(args.prompt.split())
    # without a prompt, a vocabulary without <eos> starts from the train split's first
    # word: the corpus is read with the weights, once
    config, params, corpus, vocab, _ = _load_model(args, () if prompted else ("train",))
    subwords = _subwords(args)
    decode = lambda ids: [vocab[int(i)] for i in ids]  # noqa: E731
    shown = []  # the prompt words printed before the sample
    if prompted and subwords is not None:  # the prompt's pieces (a line without <eos>)
        prompt = subwords.encode([args.prompt], vocab, "the prompt")[:-1]
        tokens, total, words = subwords.unknown([args.prompt])
        if tokens:
            note("note: " + data.Unknown("the prompt", tokens, total - 1, words)
                  .describe(vocab, "are read as <unk>"))
        shown = decode(prompt)
    elif prompted:
        prompt, unknown = data.encode_words(args.prompt.split(), vocab, "the prompt")
        if unknown is not None:
            note(f"note: {unknown.describe(vocab, 'are read as <unk>')}")
        shown = decode(prompt)
    elif data.EOS in vocab:  # start a fresh sentence
        prompt = np.asarray([vocab.index(data.EOS)], np.int32)
    else:  # no sentence ends (a synthetic corpus): the first word of the train split
        prompt = corpus.train[:1]
        shown = decode(prompt)
    plan = _shards_plan(args, config)  # one sample is one column: one group of M devices
    timings: dict = {}
    ids, logp = generate.sample(config, params, prompt, args.words,
                                temperature=args.temperature, seed=args.seed,
                                return_logprobs=True, timings=timings, plan=plan, log=note)
    pieces = shown + decode(ids)
    if subwords is not None:  # pieces back to words
        from mos_jax import subword
        pieces = subword.decode_words(pieces)
    text = generate.render(pieces)
    seconds = timings["sample_seconds"]
    stats = {"words": int(ids.size), "prompt_words": int(prompt.size),
             "temperature": args.temperature, "seed": args.seed,
             "seconds": round(seconds, 4), "words_per_s": round(ids.size / seconds, 1),
             "compile_seconds": round(timings["compile_seconds"], 2),
             "sample_ppl": math.exp(-float(np.mean(logp, dtype=np.float64)))}
    deliveries = outputs.Deliveries()
    if args.out:
        stats["out"] = outputs.where(deliveries.text("--out", args.out, text + "\n"))
    print(text, flush=True)
    print(json.dumps(stats), file=sys.stderr)
    deliveries.check()


def _cmd_plot(args) -> None:
    from mos_jax.plot import plot_learning_curves
    _output_file("--out", args.out, suffixes=_image_formats())
    runs = {Path(w).name or str(w): w for w in args.workdir}
    deliveries = outputs.Deliveries()
    out = deliveries.write("--out", args.out, lambda path: plot_learning_curves(runs, path))
    if out == Path(args.out):
        print(f"wrote {out}")
    deliveries.check(shown=False)


def _cmd_bench(args) -> None:
    from mos_jax import bench
    from mos_jax import config as config_lib
    _output_file("--out", args.out)
    _at_least("--vocab", args.vocab)
    sweep = args.vocab_sizes is not None
    for flag, value in (("--heads", args.heads), ("--plot", args.plot)):
        if value is not None and not sweep:
            raise MosJaxError(f"{flag} goes with --vocab-sizes (the cost of several "
                              "heads across vocabulary sizes): add --vocab-sizes "
                              "10000,33000,...")
    if sweep:
        for flag, value in (("--vocab", args.vocab), ("--head", args.head)):
            if value is not None:
                raise MosJaxError(f"{flag} and --vocab-sizes exclude each other: give "
                                  "the sizes with --vocab-sizes and the heads with "
                                  "--heads")
        if args.num_devices != 1:
            raise MosJaxError("bench --vocab-sizes measures one device: drop "
                              "--num-devices")
        _output_file("--plot", args.plot, suffixes=_image_formats())
        sizes = bench.parse_vocab_sizes(args.vocab_sizes)
        head_names = bench.parse_heads(args.heads)
    overrides = config_lib.parse_overrides(args.overrides)
    for key, value in (("model.head", args.head), ("model.compute_dtype", args.dtype),
                       ("model.vocab_chunk", args.vocab_chunk)):
        if value is not None:
            overrides.append((key, value))
    config = config_lib.load_config(args.config, overrides)
    workloads = tuple(w.strip() for w in args.only.split(",")) if args.only else \
        bench.WORKLOADS
    if sweep and not args.only:
        workloads = ("train", "eval")
    settings = bench.BenchSettings(
        vocab=args.vocab, batch=args.batch, bptt=args.bptt, eval_batch=args.eval_batch,
        num_devices=args.num_devices, warmup=args.warmup, repeats=args.repeats,
        dyn_windows=args.dyn_windows, workloads=workloads, matmul_n=args.matmul_n)
    if sweep:
        result = bench.run_vocab_sweep(config, sizes, head_names, settings, log=note)
        result["config"] = str(args.config)
        deliveries = outputs.Deliveries()
        if args.out:
            deliveries.text("--out", args.out, json.dumps(result, indent=2) + "\n")
        if args.plot:
            deliveries.write("--plot", args.plot,
                             lambda path: bench.plot_sweep(result, path))
        print(bench.format_sweep(result), file=sys.stderr)
        print(json.dumps(result))
        deliveries.check()
        return
    result = bench.run_bench(config, settings, log=note)
    result["config"] = str(args.config)
    deliveries = outputs.Deliveries()
    if args.out:
        deliveries.text("--out", args.out, json.dumps(result, indent=2) + "\n")
    bench.main_print(result)
    deliveries.check()


def _cmd_compare_heads(args) -> None:
    from mos_jax import config as config_lib
    from mos_jax.compare import compare_heads
    config = config_lib.load_config(args.config,
                                    config_lib.parse_overrides(args.overrides))
    workdir = args.workdir or Path("runs") / f"compare-{Path(args.config).stem}"
    summary = compare_heads(config, args.heads, workdir, log=print, steps=args.steps,
                            time_budget_s=args.time_budget, evals=args.evals,
                            rank_contexts=args.rank_contexts, test=args.test)
    print(f"wrote {summary['markdown']}, {summary['json']} and {summary['plot']}")


def _cmd_demo(args) -> None:
    from mos_jax.demo import run_demo
    run_demo(args.workdir)


def _cmd_study(args) -> None:
    from mos_jax import config as config_lib
    from mos_jax import study
    overrides = config_lib.parse_overrides(args.overrides)
    if args.vocab_sizes is not None:
        return _vocab_study(args, overrides)
    args.widths = args.widths or ",".join(map(str, study.DEFAULT_WIDTHS))
    args.workdir = args.workdir or Path("runs/study")
    encoders = study.parse_encoders(args.encoders or study.DEFAULT_ENCODERS)
    if args.config is None and args.transformer_config is None:
        defaults = study.synthetic_configs()
        configs = {e: config_lib.apply_overrides(defaults[e], overrides)
                   for e in encoders}
    else:
        if args.config is None and encoders != ["transformer"]:
            raise MosJaxError("--transformer-config alone covers the transformer "
                              "encoder only: add --config FILE for the others, or "
                              "--encoders transformer")
        configs = {}
        for e in encoders:
            path = (args.transformer_config if e == "transformer"
                    and args.transformer_config is not None else args.config)
            configs[e] = config_lib.load_config(path, overrides)
            switch = config_lib.encoder_switch_note(
                path, configs[e], e,
                "--transformer-config" if e == "transformer" else "--config")
            if switch:
                note(switch)
    if args.steps is not None and args.steps < 0:
        raise MosJaxError(f"--steps must be at least 1 (or 0: the config's own epochs), "
                          f"got {args.steps}")
    if args.evals is not None and args.evals < 1:
        raise MosJaxError(f"--evals must be at least 1, got {args.evals}")
    if args.steps == 0:  # the configs' own epochs, early stopping and schedule
        args.steps = args.evals = None
    summary = study.run_study(configs, args.heads, args.widths, args.workdir,
                              steps=args.steps, evals=args.evals,
                              rank_contexts=args.rank_contexts, log=print)
    files = [summary["markdown"], summary["json"], summary["plot"]]
    if summary.get("gap_plot"):
        files.append(summary["gap_plot"])
    print(f"wrote {', '.join(map(str, files[:-1]))} and {files[-1]}")


def _vocab_study(args, overrides) -> None:
    """study --vocab-sizes: heads x bpe vocabulary sizes at one width (the config's, or
    one --widths), on --config's corpus directory."""
    from mos_jax import config as config_lib
    from mos_jax import study
    if args.config is None:
        raise MosJaxError("--vocab-sizes trains bpe vocabularies on a corpus directory: "
                          "give its config with --config FILE (e.g. configs/ptb.py)")
    for flag, value in (("--encoders", args.encoders),
                        ("--transformer-config", args.transformer_config)):
        if value is not None:
            raise MosJaxError(f"{flag} belongs to the width study: --vocab-sizes runs "
                              "the encoder of --config (set --config.model.encoder to "
                              "choose it)")
    width = None
    if args.widths is not None:
        widths = study.parse_widths(args.widths)
        if len(widths) > 1:
            raise MosJaxError(f"--vocab-sizes runs at one width, got --widths "
                              f"{args.widths}: give one width (or none: the config's)")
        width = widths[0]
    for flag, value in (("--steps", args.steps), ("--evals", args.evals)):
        if value is not None and value < 1:
            raise MosJaxError(f"{flag} must be at least 1, got {value}")
    config = config_lib.load_config(args.config, overrides)
    workdir = args.workdir or Path("runs/vocab-study")
    summary = study.run_vocab_study(config, args.heads, args.vocab_sizes, workdir,
                                    width=width, steps=args.steps, evals=args.evals,
                                    rank_contexts=args.rank_contexts, log=print)
    print(f"wrote {workdir / 'vocab_study.md'}, {workdir / 'vocab_study.json'} and "
          f"{summary['plot']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mos-jax", description="AWD-LSTM with a Mixture-of-Softmaxes head, in JAX.")
    parser.add_argument("--version", action="version", version=f"mos-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from mos_jax.download import CORPORA
    p = sub.add_parser("download", help="fetch a corpus (PTB, WikiText-2, WikiText-103, "
                       "the One Billion Word benchmark) and verify checksums")
    p.add_argument("corpus", choices=sorted(CORPORA))
    p.add_argument("--dest", required=True, type=Path, help="directory for the files")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("sources", help="list the corpus sources (data.dir, --data) and "
                       "the corpora `download` fetches")
    p.set_defaults(func=_cmd_sources)

    p = sub.add_parser("import", aliases=["import-torch"],
                       help="convert reference weights (PyTorch .pt or NumPy .npz)")
    p.add_argument("file", type=Path, help="a .pt file (state dict or pickled model) or "
                   "an .npz of reference-named arrays")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--head", default=None,
                   help="head to read the weights as, one whose class declares a "
                   "reference_layout (default: from the weights)")
    p.add_argument("--data", default=None, help="the corpus the weights were trained "
                   "on: its vocabulary (ids in order of first occurrence, as the "
                   "reference numbers them) is recorded in OUT/vocab.json, and every "
                   "later --data is mapped through it by string")
    p.set_defaults(func=_cmd_import)

    def placement(p, one_group: bool = False, what: str = ""):
        """--num-devices and --model-shards (read by `_shards_plan`); `one_group`: by
        default M devices (commands of few columns), else all local devices."""
        default = ("default: the --model-shards devices, one group" if one_group
                   else "default 0: all local devices")
        p.add_argument("--num-devices", type=int, default=None if one_group else 0,
                       help=f"devices to split the columns over{what} (0: all local "
                       f"devices; {default})")
        p.add_argument("--model-shards", type=int, default=1, metavar="M",
                       help="of those devices, M in each group splitting the vocabulary "
                       "(the mesh's model axis; default 1: none)")

    def model_source(p):
        p.add_argument("--workdir", type=Path, help="a training run's work directory")
        p.add_argument("--weights", type=Path, help="a directory written by `mos-jax import`")
        p.add_argument("--data", default=None, help="a corpus source: a directory, "
                       "'synthetic' or 'tfds:NAME' (`mos-jax sources` lists them), read "
                       "with the run's source options (default with --workdir: the "
                       "run's corpus)")

    p = sub.add_parser("evaluate", help="perplexity of a run's best weights or of "
                       "imported weights on a split")
    model_source(p)
    p.add_argument("--split", default=None, choices=["train", "valid", "test"],
                   help="the split to score (default test)")
    p.add_argument("--text", type=Path, default=None, metavar="FILE",
                   help="score a plain text file instead of a split: its words are "
                   "mapped through the weights' vocabulary, unknown ones to <unk> "
                   "(counted on stderr), or refused when it has no <unk>; --data then "
                   "only gives the vocabulary of weights that record none, and the "
                   "training counts of --by-frequency")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--bptt", type=int, default=70)
    p.add_argument("--dump", type=Path, help="save per-token log-probs [rows, batch] as .npy")
    placement(p)
    p.add_argument("--by-frequency", action="store_true",
                   help="print a table of perplexity by training-set word count (the "
                   "most frequent words, count buckets, <unk>) instead of the JSON line")
    p.add_argument("--top-words", type=int, default=100, metavar="N",
                   help="with --by-frequency: the N most frequent words form the first "
                   "bucket (default 100; 0: none)")
    p.add_argument("--count-edges", type=_count_edges, default=(1000, 100, 10),
                   metavar="E1,E2,...", help="with --by-frequency: training-count edges "
                   "of the other buckets (default 1000,100,10: >= 1000, 100-999, "
                   "10-99, < 10)")
    p.add_argument("--out", type=Path, help="also write the JSON result here (with "
                   "--by-frequency: the buckets too)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("dynamic-eval", help="dynamic evaluation (Krause et al.) of a "
                       "run's best weights or of imported weights")
    model_source(p)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--preset", default="default",
                   help="lr/lamb/epsilon of the paper (mos_jax.dynamic_eval.PRESETS): "
                   "default, ptb (lamb 0.075), wt2 (eps 0.002)")
    p.add_argument("--lr", type=float, help="eta (default 0.002)")
    p.add_argument("--lamb", type=float, help="decay towards the trained weights")
    p.add_argument("--epsilon", type=float)
    p.add_argument("--bptt", type=int, default=5, help="window length")
    p.add_argument("--batch-size", type=int, default=1, help="evaluation columns")
    p.add_argument("--stats-batch-size", type=int, default=100)
    p.add_argument("--max-batches", type=int, default=None,
                   help="windows of the gradient statistics pass (default: all)")
    p.add_argument("--rms", action="store_true", help="MS = sqrt(mean g^2), not sum")
    p.add_argument("--dump", type=Path, help="save per-token log-probs as .npy")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    placement(p, what=" for the gradient statistics (the update pass runs on one)")
    p.set_defaults(func=_cmd_dynamic_eval)

    p = sub.add_parser("rank", help="empirical rank of the log-probability matrix "
                       "[contexts, V] and its singular value spectrum (the softmax "
                       "bottleneck)")
    model_source(p)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"],
                   help="the contexts are the first N positions of this split")
    p.add_argument("--contexts", type=int, default=None, help="N (default: min(V, "
                   "tokens in the split), capped to fit --max-memory-gb)")
    p.add_argument("--max-memory-gb", type=float, default=4.0,
                   help="memory for the [N, V] matrix and its SVD (about 20 N V bytes)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="parallel columns (1: every context sees its whole prefix)")
    p.add_argument("--bptt", type=int, default=70, help="window length")
    placement(p, one_group=True)
    p.add_argument("--plot", type=Path, default=None, help="the spectrum as a PNG "
                   "(default: rank_spectrum.png in --workdir, or here with --weights)")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    p.set_defaults(func=_cmd_rank)

    p = sub.add_parser("generate", help="sample text from a run's best weights or from "
                       "imported weights",
                       epilog="The text goes to stdout, a JSON line of statistics to "
                       "stderr; <eos> is printed as a line break.")
    model_source(p)
    p.add_argument("--prompt", default=None, help="words to start from, e.g. \"the "
                   "company said\" (default: a fresh sentence after <eos>)")
    p.add_argument("--words", type=int, default=100, help="number of words to sample")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="> 0: below 1 sharper (towards the most likely words), above 1 "
                   "flatter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the text here")
    placement(p, one_group=True, what=" (one sample is one column)")
    p.set_defaults(func=_cmd_generate)

    for name, text in (("train", "train a model (or continue the run in --workdir)"),
                       ("finetune", "the finetune stage from a run's best weights")):
        p = sub.add_parser(name, help=text,
                           epilog="Any config key can be overridden: --config.optim.lr=10")
        p.add_argument("--config", type=Path, help="a config file, e.g. configs/ptb.py")
        p.add_argument("--workdir", type=Path,
                       help="where checkpoints and metrics go (default runs/CONFIG_NAME)")
        p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config (a file with overrides, "
                       "or a run's) as JSON, or the reference of every key",
                       epilog="Any config key can be overridden: --config.optim.lr=10")
    p.add_argument("--config", type=Path, help="a config file, e.g. configs/ptb.py")
    p.add_argument("--workdir", type=Path, help="a run's work directory (its config.json)")
    p.add_argument("--reference", action="store_true",
                   help="print every key with its default, range and meaning (Markdown; "
                   "docs/config.md)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("plot", help="learning curves of runs to a PNG")
    p.add_argument("--workdir", type=Path, action="append", required=True,
                   help="a run's work directory (repeat to compare runs)")
    p.add_argument("--out", type=Path, default=Path("learning_curves.png"))
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("bench", help="tokens/s, compile time, peak memory and MFU of a "
                       "config's train step, evaluation and dynamic evaluation",
                       epilog="Any config key can be overridden: --config.model.nhid=512")
    p.add_argument("--config", type=Path, default=Path("configs/ptb.py"))
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: "
                   "the config's corpus's; PTB: 10000)")
    p.add_argument("--batch", type=int, default=0, help="train batch (default: config)")
    p.add_argument("--bptt", type=int, default=0, help="window length (default: config)")
    p.add_argument("--eval-batch", type=int, default=0, help="default: config")
    p.add_argument("--head", default=None, help="model.head (default: config)")
    p.add_argument("--dtype", default=None, help="model.compute_dtype: float32, "
                   "bfloat16 or auto (default: config)")
    p.add_argument("--vocab-chunk", default=None,
                   help="model.vocab_chunk: 0 (whole logits), N, or auto (default: config)")
    p.add_argument("--num-devices", type=int, default=1,
                   help="devices for the train step (0: all local devices)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per workload")
    p.add_argument("--dyn-windows", type=int, default=32,
                   help="dynamic-evaluation windows per timed call")
    p.add_argument("--only", default=None,
                   help="comma-separated workloads: train,eval,dynamic_eval (one per "
                   "process gives a clean peak-memory figure on CPU)")
    p.add_argument("--matmul-n", type=int, default=0, help="size of the matmul that "
                   "measures the peak FLOP/s (default 0: 2048 on CPU, 8192 elsewhere)")
    p.add_argument("--vocab-sizes", default=None, metavar="V1,V2,...",
                   help="cost against vocabulary size: train and eval tokens/s and "
                   "memory of each head of --heads at each size, on the zipf synthetic "
                   "chain, heads interleaved (e.g. 10000,33000,100000,267000)")
    p.add_argument("--heads", default=None, help="with --vocab-sizes: comma-separated "
                   "heads (default: every registered head)")
    p.add_argument("--plot", type=Path, default=None, help="with --vocab-sizes: a PNG "
                   "of tokens/s and memory against V, one line per head")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("compare-heads", help="train several heads with one config and "
                       "budget; table of parameters, tokens/s, peak memory, valid "
                       "perplexity and rank, and one plot",
                       epilog="Any config key can be overridden: --config.train.seed=1")
    p.add_argument("--config", type=Path, required=True, help="a config file")
    p.add_argument("--heads", required=True,
                   help="comma-separated head names, e.g. softmax,mos,moc")
    p.add_argument("--workdir", type=Path, help="head NAME trains in WORKDIR/NAME "
                   "(default runs/compare-CONFIG_NAME)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="train steps per head, in --evals "
                        "epochs")
    budget.add_argument("--time-budget", type=float, metavar="S",
                        help="seconds of training per head (train.time_budget_s)")
    p.add_argument("--evals", type=int, help="validations (epochs) in a --steps budget "
                   "(default: the config's max_epochs, at most 20)")
    p.add_argument("--rank-contexts", type=int, default=2000,
                   help="cap on the validation contexts N of the rank (N = min(V, cap))")
    p.add_argument("--test", action="store_true",
                   help="also report the test perplexity of finished runs")
    p.set_defaults(func=_cmd_compare_heads)

    p = sub.add_parser("demo", help="softmax vs MoS on the built-in high-rank corpus")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("study", help="the width study: heads x widths x encoders with "
                       "one budget; validation perplexity and rank against width, as a "
                       "table and one plot",
                       epilog="Default: the built-in synthetic corpus, 3,000 steps per "
                       "run. Overrides (--config.KEY=VALUE) apply to every encoder's "
                       "config.")
    p.add_argument("--config", type=Path, help="base config of every encoder (default: "
                   "the built-in synthetic study configs)")
    p.add_argument("--transformer-config", type=Path, help="base config of the "
                   "transformer encoder (default: --config)")
    p.add_argument("--heads", default="softmax,mos", help="comma-separated head names "
                   "(default softmax,mos)")
    p.add_argument("--widths", default=None, help="comma-separated widths d: "
                   "emsize and the encoder's output width (default 8,16,32,64; with "
                   "--vocab-sizes one width, default the config's)")
    p.add_argument("--vocab-sizes", default=None, metavar="N,N,...",
                   help="the vocabulary study instead: one run per head and bpe "
                   "vocabulary size (data.tokenizer=bpe, data.vocab_size=N, trained on "
                   "--config's corpus directory) at one width; validation perplexity "
                   "per word and rank (default workdir runs/vocab-study)")
    p.add_argument("--encoders", default=None,
                   help="comma-separated encoders (default lstm,transformer; the "
                   "vocabulary study: the config's)")
    p.add_argument("--steps", type=int, default=3000, help="train steps per run "
                   "(default 3000; width study only, 0: the config's own epochs and early stopping, "
                   "train.max_epochs x train.steps_per_epoch)")
    p.add_argument("--evals", type=int, default=6, help="validated epochs the steps are "
                   "split into (default 6)")
    p.add_argument("--rank-contexts", type=int, default=2000,
                   help="cap on the validation contexts N of the rank (N = min(V, cap))")
    p.add_argument("--workdir", type=Path, default=None,
                   help="default runs/study (with --vocab-sizes runs/vocab-study)")
    p.set_defaults(func=_cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    if rest and args.command not in OVERRIDE_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
        hook = functools.partial(_unraisable, sys.unraisablehook)
        hook.drops_closed_loop_noise = True  # installed once a process
        sys.unraisablehook = hook
    try:
        args.func(args)
    except MosJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


def _unraisable(previous, unraisable) -> None:
    """Drop the "Event loop is closed" errors that Orbax's reader threads report, one
    per array, during and after a checkpoint that failed to restore (the command's own
    error message says what happened); pass anything else on to `previous`."""
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return
    previous(unraisable)


if __name__ == "__main__":
    sys.exit(main())
