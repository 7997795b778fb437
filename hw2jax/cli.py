"""The `hw2jax` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hw2jax import cpu, malloc
from hw2jax.errors import Hw2jaxError, InputError, MissingFileError


def _theory(args: argparse.Namespace) -> int:
    from hw2jax import theory

    report = theory.run_all(lengths=args.lengths)
    print(json.dumps(report, indent=2) if args.json else theory.format_report(report))
    return 0


def _host_devices(text: str) -> int | str:
    """--host-devices: a positive count or 'auto'."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive count, got {text!r}")
    return n


def _start_jax_runtime(args: argparse.Namespace) -> None:
    """What must happen before jax starts: splitting the CPU, the distributed runtime."""
    if args.host_devices:
        from hw2jax.train.sharding import split_host_cpu

        auto = args.host_devices == "auto"
        split_host_cpu(cpu.usable_cores() if auto else args.host_devices)
    if args.distributed or args.coordinator or args.num_processes:
        from hw2jax.train.sharding import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def auto_devices(config) -> str | None:
    """--host-devices auto: on a CPU backend, as many of the split cores as the batch sizes
    allow; on a GPU or TPU, None (its own devices, not the host's)."""
    import jax

    from hw2jax.train.sharding import auto_host_devices

    if jax.default_backend() != "cpu":
        return None
    if jax.process_count() > 1:  # a count below the global one would leave processes out
        raise InputError(
            "--host-devices auto is for one process; with several processes give a "
            "count, e.g. --host-devices 2."
        )
    sizes = (config.batch_size, config.eval_batch_size)
    return str(auto_host_devices(jax.device_count(), sizes))


def _apply_flags(config, args: argparse.Namespace, flags: dict[str, object]):
    """--data-dir, --data-source and the command's own flags (config key -> typed value; None
    means unset, while 0 stays so the check can refuse it), then the --set overrides."""
    from hw2jax import config as config_lib

    flags = {"data_dir": args.data_dir, "data_source": args.data_source, **flags}
    config_lib.set_values(config, {k: v for k, v in flags.items() if v is not None})
    config_lib.apply_overrides(config, args.set)
    return config


def _config_from_args(args: argparse.Namespace, **flags: str | None):
    """Splits the CPU and starts the distributed runtime if asked, then returns the config file
    with --epochs, --devices, --data-dir, --data-source, the experiment's own
    flags and --set overrides applied (:func:`_apply_flags`)."""
    from hw2jax import config as config_lib

    distributed = bool(args.distributed or args.coordinator or args.num_processes)
    if distributed and args.devices not in (None, "all"):  # refused before any process waits
        raise InputError(
            f"--devices {args.devices} with several processes: each batch is split over the "
            "devices of every process (a count leaves some process without rows); leave "
            "--devices out or pass --devices all."
        )
    _start_jax_runtime(args)
    config = config_lib.load_config(args.config)
    devices = args.devices or args.host_devices  # split cores only help with data parallel
    if devices == "auto":
        devices = auto_devices(config)
    if distributed:
        devices = "all"
    config = _apply_flags(config, args, {"epochs": args.epochs, "devices": devices, **flags})
    if config.devices != "1":  # refused before any data is read ('all' counted here too)
        from hw2jax.train.sharding import check_batch_split, num_devices

        check_batch_split(num_devices(config.devices), (config.batch_size, config.eval_batch_size))
    return config


def _exit_code(history: dict) -> int:
    """0 when every epoch finished; after a saved stop, 143 for SIGTERM and 130 otherwise (the
    shell's codes for the two signals), so schedulers see that the run did not finish."""
    if history["status"] == "done":
        return 0
    return 143 if history.get("stopped_by") == "SIGTERM" else 130


def _vit_train(args: argparse.Namespace) -> int:
    from hw2jax.tasks import vit

    config = _config_from_args(args, **{"model.attention": args.attention})
    return _exit_code(vit.train_and_evaluate(config, args.workdir))


def _vit_ablate(args: argparse.Namespace) -> int:
    from hw2jax.tasks import vit

    config = _config_from_args(args, **{"model.attention": args.attention})
    rows = vit.ablate(config, args.workdir)
    return _sweep_ended(len(rows), 1 + len(config.ablation), Path(args.workdir) / "ablation.md")


def _sentiment_train(args: argparse.Namespace) -> int:
    from hw2jax.tasks import sentiment

    config = _config_from_args(
        args, encoder=args.encoder, cache_features=args.cache_features, cache_dir=args.cache_dir
    )
    return _exit_code(sentiment.train_and_evaluate(config, args.workdir))


def _sentiment_pack(args: argparse.Namespace) -> int:
    from hw2jax import config as config_lib
    from hw2jax.tasks import sentiment

    config = _apply_flags(config_lib.load_config(args.config), args, {"encoder": args.encoder})
    sizes = sentiment.pack(config, args.out, args.dtype)
    for name, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {Path(args.out) / name}")
    print(f"{sum(sizes.values()) / 2**20:8.2f} MiB in all")
    return 0


def _mqar_train(args: argparse.Namespace) -> int:
    from hw2jax.tasks import mqar

    config = _config_from_args(args)
    return _exit_code(mqar.train_and_evaluate(config, args.workdir))


def _mqar_sweep(args: argparse.Namespace) -> int:
    from hw2jax.tasks import mqar

    config = _config_from_args(args)
    rows = mqar.sweep(config, args.workdir)
    expected = len(config.sweep.mixers) * len(config.sweep.seq_lens) * len(config.sweep.dims)
    return _sweep_ended(len(rows), expected, Path(args.workdir) / "results.md")


def _sweep_ended(done: int, expected: int, table: Path) -> int:
    """Prints a finished sweep's table (0), or how a stopped one resumes (130)."""
    if done < expected:
        print(f"Stopped after {done} of {expected} runs; run the same command to resume.")
        return 130
    print(table.read_text(), end="")
    return 0


def _read_reviews(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(where, text) for every review given: arguments, ``-`` for stdin, ``--file`` (one
    review per line, blank lines skipped). Bytes that are not UTF-8 are refused naming the
    place, or replaced with U+FFFD under ``--errors replace``; all before any model loads."""

    def decode(raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8", errors=args.errors)
        except UnicodeDecodeError as e:
            raise InputError(
                f"{where} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                "re-encode it (iconv -t utf-8) or pass --errors replace."
            ) from None

    def lines(data: bytes, name: str) -> list[tuple[str, str]]:
        out = []
        for number, raw in enumerate(data.splitlines(), 1):
            text = decode(raw, f"{name} line {number}")
            if text.strip():
                out.append((f"{name}:{number}", text))
        return out

    reviews: list[tuple[str, str]] = []
    for number, text in enumerate(args.texts, 1):
        if text == "-":
            reviews += lines(sys.stdin.buffer.read(), "stdin")
        else:  # undecodable argv bytes arrive as surrogates: back to bytes, then decode
            raw = os.fsencode(text)
            reviews.append((f"argument {number}", decode(raw, f"argument {number}")))
    if args.file:
        try:
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise MissingFileError(f"--file {args.file}: {e.strerror}.") from None
        reviews += lines(data, str(args.file))
    if not reviews:
        raise InputError("no review to predict: give texts, --file FILE or - for stdin.")
    return reviews


def _sentiment_predict(args: argparse.Namespace) -> int:
    from hw2jax.tasks import sentiment

    reviews = _read_reviews(args)
    rows = sentiment.predict_reviews(args.workdir, [text for _, text in reviews])
    for (where, text), row in zip(reviews, rows, strict=True):
        if args.json:
            print(json.dumps({"source": where, "text": text, **row}, ensure_ascii=False))
            continue
        cut = (
            f"  (cut to {row['max_length']} of {row['tokens']} tokens)" if row["truncated"] else ""
        )
        print(f"{row['p_positive']:.4f}  {text}{cut}")
    return 0


def _vit_eval(args: argparse.Namespace) -> int:
    from hw2jax.tasks import vit

    result = vit.evaluate_workdir(args.workdir, args.data_dir, best=not args.latest)
    print(json.dumps(result, indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from hw2jax.train.report import report

    print(report(args.workdir, tuple(args.against), args.plot))
    return 0


def _machine(args: argparse.Namespace) -> int:
    from hw2jax import machine_info

    info = machine_info.describe(build=args.build)
    print(json.dumps(info, indent=2) if args.json else machine_info.text(info))
    return 0


def _data_locate(args: argparse.Namespace) -> int:
    from hw2jax.data import fashion_mnist

    print(fashion_mnist.find_source(args.data_dir, args.data_source).description)
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def _add_train_parser(
    group,
    data_help: str,
    sources: list[str],
    name: str = "train",
    help: str = "train (resumes if WORKDIR has a checkpoint)",
) -> argparse.ArgumentParser:
    train = group.add_parser(name, help=help)
    train.add_argument("--config", required=True, help="an experiments/*.py file")
    train.add_argument("--workdir", required=True, help="checkpoints, history and plots go here")
    train.add_argument("--epochs", type=int, help="override the config's epochs")
    train.add_argument("--data-dir", help=f"{data_help} (env: HW2JAX_DATA_DIR)")
    train.add_argument("--data-source", choices=sources)
    train.add_argument(
        "--devices",
        help="'all' or N: shard each batch over N devices "
        "(with several processes, always all: every process's devices)",
    )
    train.add_argument(
        "--host-devices",
        type=_host_devices,
        metavar="N|auto",
        help="on CPU: show the cores to jax as N devices and shard each batch over "
        "them (faster for the small ViT); implies --devices N (all, with several "
        "processes). 'auto': "
        "one per core, as many as the batch sizes allow; none on a GPU/TPU",
    )
    multi = train.add_argument_group("several processes or hosts (jax.distributed)")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize (auto-detects SLURM, MPI, TPU)",
    )
    multi.add_argument("--coordinator", help="HOST:PORT of process 0, elsewhere")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    _add_set_argument(train, "e.g. --set learning_rate=5e-4")
    return train


def _add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, {example}",
    )


class _AttentionVariant(argparse.Action):
    """--attention: stores the name; its help lists the registered variants, read only when
    help is shown (the registry imports jax, which every other command would pay for)."""

    @property
    def help(self) -> str:
        from hw2jax.attention import registry

        return (
            "the ViT's attention, a registered variant: "
            f"{', '.join(registry.names(bidirectional=True))}, or one that the config file "
            "registers (checked with the config; causal-only ones are refused with the reason)"
        )

    @help.setter
    def help(self, value) -> None:  # argparse's __init__ assigns it; the property answers
        pass

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hw2jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    theory = commands.add_parser(
        "theory", help="show the RNN recurrence, the self-attention copy and linear attention"
    )
    theory.add_argument("--json", action="store_true", help="print machine-readable JSON")
    theory.add_argument(
        "--lengths",
        type=_int_list,
        default=(256, 1024, 4096),
        help="comma-separated sequence lengths to time (default: 256,1024,4096)",
    )
    theory.set_defaults(func=_theory)

    vit = commands.add_parser("vit", help="ViT on FashionMNIST").add_subparsers(
        dest="vit_command", required=True, metavar="ACTION"
    )
    train = _add_train_parser(vit, "folder with the idx files", ["auto", "idx", "tfds"])
    train.add_argument("--attention", metavar="VARIANT", action=_AttentionVariant)
    train.set_defaults(func=_vit_train)
    ablate = _add_train_parser(
        vit,
        "folder with the idx files",
        ["auto", "idx", "tfds"],
        name="ablate",
        help="the config's recipe and each variant of its ablation, compared on valid "
        "(resumes run by run)",
    )
    ablate.add_argument("--attention", metavar="VARIANT", action=_AttentionVariant)
    ablate.set_defaults(func=_vit_ablate)
    ev = vit.add_parser("eval", help="test accuracy of the best checkpoint in WORKDIR")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--data-dir")
    ev.add_argument("--latest", action="store_true", help="use the latest, not the best")
    ev.set_defaults(func=_vit_eval)

    senti = commands.add_parser("sentiment", help="frozen BERT + BiGRU on IMDB")
    senti = senti.add_subparsers(dest="sentiment_command", required=True, metavar="ACTION")
    train = _add_train_parser(
        senti,
        "aclImdb folder or .tar.gz, or a token pack (sentiment pack)",
        ["auto", "local", "tfds"],
    )
    train.add_argument("--encoder", help="hub id, local HF folder, or 'minilm' (offline)")
    train.add_argument(
        "--cache-features",
        action="store_const",
        const=True,
        help="run the frozen encoder once and train the head from a disk cache",
    )
    train.add_argument(
        "--cache-dir",
        help="where tokens and encoder features are cached (default ~/.cache/hw2jax/features, "
        "shared by every work dir)",
    )
    train.set_defaults(func=_sentiment_train)
    pack = senti.add_parser(
        "pack",
        help="the encoder (bf16 by default) and the reviews tokenized, into OUT: what a "
        "machine that receives few megabytes needs to train (--encoder OUT/encoder "
        "--data-dir OUT/imdb_tokens.npz)",
    )
    pack.add_argument("--config", required=True, help="an experiments/*.py file")
    pack.add_argument("--out", required=True, help="a folder for encoder/ and imdb_tokens.npz")
    pack.add_argument("--encoder", help="hub id, local HF folder, or 'minilm' (offline)")
    pack.add_argument("--data-dir", help="aclImdb folder or .tar.gz (env: HW2JAX_DATA_DIR)")
    pack.add_argument("--data-source", choices=["auto", "local", "tfds"])
    pack.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="the encoder's weights on disk (default bfloat16: half the bytes; they load back "
        "as float32)",
    )
    _add_set_argument(pack, "e.g. --set max_length=256 (the run must use the same)")
    pack.set_defaults(func=_sentiment_pack)
    pred = senti.add_parser("predict", help="P(positive) for each text, best checkpoint")
    pred.add_argument("--workdir", required=True)
    pred.add_argument("texts", nargs="*", metavar="TEXT", help="reviews; - reads stdin")
    pred.add_argument("--file", help="a file with one review per line")
    pred.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="bytes that are not UTF-8: refuse (default) or replace with U+FFFD",
    )
    pred.add_argument("--json", action="store_true", help="one JSON object per review")
    pred.set_defaults(func=_sentiment_predict)

    mqar = commands.add_parser("mqar", help="multi-query associative recall (attention variants)")
    mqar = mqar.add_subparsers(dest="mqar_command", required=True, metavar="ACTION")
    train = _add_train_parser(mqar, "unused: the sequences are generated", ["generated"])
    train.set_defaults(func=_mqar_train)
    sweep = _add_train_parser(
        mqar,
        "unused: the sequences are generated",
        ["generated"],
        name="sweep",
        help="every mixer x length x width of the config's sweep, then the table and plot "
        "(resumes run by run)",
    )
    sweep.set_defaults(func=_mqar_sweep)

    rep = commands.add_parser("report", help="a run's per-epoch table (Markdown) from WORKDIR")
    rep.add_argument("workdir", help="a work dir of `vit train` or `sentiment train`")
    rep.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="WORKDIR",
        help="another run (repeatable): adds each run's accuracy per epoch, side by side, and "
        "draws all the runs' curves on one plot",
    )
    rep.add_argument(
        "--plot",
        metavar="PNG",
        help="where --against draws the curves (default: compared.png in WORKDIR)",
    )
    rep.set_defaults(func=_report)

    mach = commands.add_parser(
        "machine",
        help="this machine as runs record it, the C++ kernels' build and what auto timed here",
        description="This machine as every run and benchmark JSON records it (CPU, cores, "
        "vector features, versions, the code's commit, settings), the float32 peak estimate, "
        "the C++ kernels' build and what runs the bf16 products, and every shape class auto "
        "has timed here with its paths' times: the lines to give with a figure or a bug report.",
    )
    mach.add_argument(
        "--build", action="store_true", help="build the kernels first if they are not yet"
    )
    mach.add_argument("--json", action="store_true", help="print machine-readable JSON")
    mach.set_defaults(func=_machine)

    data = commands.add_parser("data", help="find datasets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    locate = data.add_parser("locate", help="say where FashionMNIST would be loaded from")
    locate.add_argument("--data-dir")
    locate.add_argument("--data-source", choices=["auto", "idx", "tfds"], default="auto")
    locate.set_defaults(func=_data_locate)
    return parser


def _leaves_the_runtime_broken(error: Exception) -> bool:
    """A lost peer process or a failed checkpoint write (their modules are loaded if a run
    started)."""
    sharding = sys.modules.get("hw2jax.train.sharding")
    checkpoints = sys.modules.get("hw2jax.train.checkpoints")
    return (sharding is not None and isinstance(error, sharding.PeerLost)) or (
        checkpoints is not None and isinstance(error, checkpoints.CheckpointWriteError)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Hw2jaxError as e:  # bad input or a damaged file: one line that names the fix
        print(f"hw2jax: error: {e}", file=sys.stderr)
        if _leaves_the_runtime_broken(e):
            # jax's exit waits at a barrier for a lost process, then aborts the interpreter
            # after its heartbeat timeout (100 s); orbax's unfinished writes print tracebacks
            # while Python shuts down. The history is written: end now, with this line.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:  # before a run's own handler was installed, or after it ended
        print("hw2jax: stopped by Ctrl-C.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output piped into a reader that closed early (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run() -> None:
    """The ``hw2jax`` command: :func:`main` in a process whose malloc keeps XLA's freed buffers
    (:mod:`hw2jax.malloc`; tests call :func:`main`, which restarts nothing)."""
    malloc.restart_with_settings()
    sys.exit(main())


if __name__ == "__main__":
    run()
