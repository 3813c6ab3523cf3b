"""The ``ember`` command line.

``ember models add|list|rm`` manages the local model catalog; ``ember generate``
streams one answer and reports time to first token and tokens/s; ``ember chat`` is
an interactive loop with history. Settings come from flags and the environment
(``EMBER_HOME``), read here in ``main()`` and nowhere at import time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ember_core import EmberError, InvalidRequestError
from ember_platform import cli_billing, cli_pool, serve

DEFAULT_MODEL = "smollm2-135m"


def _catalog(args: argparse.Namespace) -> Any:
    from ember_weights_store import ModelCatalog, default_home

    return ModelCatalog(Path(args.home) if args.home else default_home())


def _engine(args: argparse.Namespace, err: TextIO) -> Any:
    from ember_functions.engine_config import EngineConfig
    from ember_functions.loading import load_engine

    config = EngineConfig(dtype=args.dtype, num_threads=args.threads, max_num_seqs=8)
    return load_engine(_catalog(args), args.model, config, err=err)


def _sampling(args: argparse.Namespace) -> Any:
    from ember_functions.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def _stream(engine: Any, prompt: Any, params: Any, out: TextIO, err: TextIO) -> str:
    """Runs one request on this thread, printing deltas as they come."""
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params)
    first: float | None = None
    pieces: list[str] = []
    usage = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id != rid:
                continue
            if first is None and o.token_ids:
                first = time.perf_counter()
            if o.text:
                pieces.append(o.text)
                out.write(o.text)
                out.flush()
            if o.finished:
                usage = o.usage
                if o.error:
                    raise EmberError(f"generation failed: {o.error}")
    end = time.perf_counter()
    out.write("\n")
    if usage is not None and first is not None:
        decode_s = end - first
        rate = (usage.completion_tokens - 1) / decode_s if decode_s > 0 else float("nan")
        print(
            f"[ttft {first - t0:.3f} s · {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens · {rate:.1f} tok/s]",
            file=err,
        )
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    engine = _engine(args, err)
    prompt: Any = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    if args.system and not args.raw:
        prompt.insert(0, {"role": "system", "content": args.system})
    _stream(engine, prompt, _sampling(args), out, err)
    return 0


def cmd_chat(args: argparse.Namespace, out: TextIO, err: TextIO, inp: TextIO) -> int:
    engine = _engine(args, err)
    params = _sampling(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("chat with the model; /reset clears the history, /exit or Ctrl-D quits", file=err)
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            del history[int(bool(args.system)) :]
            print("history cleared", file=err)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _stream(engine, history, params, out, err)
        except EmberError as exc:  # e.g. the history outgrew the context window
            history.pop()
            print(f"error: {exc.message}", file=err)
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_models_add(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    catalog = _catalog(args)
    if args.source.endswith(".gguf"):
        path = catalog.add_gguf(Path(args.source), name=args.name or Path(args.source).stem)
    else:
        path = catalog.add(args.source, progress=True)
    print(f"installed: {path}", file=out)
    return 0


def cmd_models_import(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """A Hugging Face model directory into the catalog and the store, or a single
    ``.safetensors`` file into the store (weights only); chunks shared with models already
    stored (a fine-tune of one, say) are not stored twice."""
    import shutil

    from ember_weights_store import validate_model_name
    from ember_weights_store.catalog import byte_progress

    src = Path(args.path)
    single = src.is_file() and src.suffix == ".safetensors"
    if not single and not (src / "config.json").is_file():
        raise InvalidRequestError(
            f"{src} is neither a Hugging Face model directory (with config.json) nor a "
            ".safetensors file; point at one of those"
        )
    catalog = _catalog(args)
    name = validate_model_name(args.name or (src.stem if single else src.name))
    if catalog.is_installed(name):
        raise InvalidRequestError(f"{name!r} is installed already; `ember models rm {name}` first")
    store = catalog.store()
    with byte_progress(f"importing {name}", enabled=args.progress) as on_progress:
        if single:
            report = store.import_safetensors_file(src, model_id=name, on_progress=on_progress)
        else:
            report = store.import_hf_dir(src, model_id=name, on_progress=on_progress)
    if not single:  # a single file has no config or tokenizer to serve it with
        shutil.copytree(src, catalog.path_for(name))
    print(
        f"imported {name}{' (weights only)' if single else ''}: {report.num_chunks} chunks, "
        f"{report.raw_bytes / 1e6:.1f} MB raw, {report.stored_bytes / 1e6:.1f} MB written, "
        f"{report.dedup_bytes / 1e6:.1f} MB deduplicated, {report.seconds:.1f} s",
        file=out,
    )
    return 0


def cmd_models_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_weights_store import KNOWN_MODELS

    catalog = _catalog(args)
    installed = set(catalog.installed())
    for name in sorted(installed):
        print(f"{name:24} installed   {catalog.path_for(name)}", file=out)
    for model_id, revision in catalog.store().list_models():
        if model_id not in installed:  # pulled, or a single-file import: in the store only
            print(f"{model_id:24} stored      {model_id}@{revision}", file=out)
    for known in KNOWN_MODELS:
        if known.name not in installed:
            print(f"{known.name:24} available   ember models add {known.name}", file=out)
    return 0


def cmd_models_rm(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _catalog(args).remove(args.name)
    print(f"removed {args.name}", file=out)
    return 0


def _s3_tier(args: argparse.Namespace) -> Any:
    from ember_weights_store.s3_tier import S3Tier

    url = args.url
    if not url.startswith("s3://"):
        raise InvalidRequestError(f"expected an s3://bucket/prefix URL, got {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return S3Tier(bucket=bucket, prefix=prefix, endpoint_url=args.endpoint_url)


def cmd_models_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    catalog = _catalog(args)
    name = Path(catalog.resolve(args.name)).name
    catalog.ensure_in_store(name)
    m = catalog.store().manifest(name)
    raw = m.raw_size_bytes
    stored = sum(c.stored_size for c in m.chunks)
    codecs: dict[str, int] = {}
    for c in m.chunks:
        codecs[c.codec] = codecs.get(c.codec, 0) + 1
    print(f"model      {m.model_id}@{m.revision} ({m.architecture.get('model_type')})", file=out)
    print(f"tensors    {len(m.tensors)} in buffers {m.buffer_sizes}", file=out)
    print(
        f"chunks     {len(m.chunks)} x <= {m.chunk_size_bytes >> 20} MiB, codecs {codecs}", file=out
    )
    print(
        f"bytes      raw {raw / 1e6:.1f} MB, stored {stored / 1e6:.1f} MB "
        f"({stored / raw:.3f} of raw)",
        file=out,
    )
    print(f"tokenizer  {', '.join(sorted(m.tokenizer_files))}", file=out)
    return 0


def cmd_models_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_weights_store.model_copies import verify_model

    catalog = _catalog(args)
    name = Path(catalog.resolve(args.name)).name
    catalog.ensure_in_store(name)
    problems = verify_model(catalog.store(), name)
    for p in problems:
        print(f"BAD  {p}", file=out)
    print(f"{name}: {'OK' if not problems else f'{len(problems)} bad copies'}", file=out)
    return 0 if not problems else 1


def cmd_models_push(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_weights_store.catalog import byte_progress
    from ember_weights_store.model_copies import copy_model

    catalog = _catalog(args)
    name = Path(catalog.resolve(args.name)).name
    catalog.ensure_in_store(name)
    with byte_progress(f"pushing {name}", enabled=args.progress) as on_progress:
        copied = copy_model(catalog.store().origin, _s3_tier(args), name, on_progress=on_progress)
    print(f"pushed {name} to {args.url}: {copied / 1e6:.1f} MB sent", file=out)
    return 0


def cmd_models_pull(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ember_weights_store.catalog import byte_progress
    from ember_weights_store.model_copies import copy_model

    with byte_progress(f"pulling {args.name}", enabled=args.progress) as on_progress:
        copied = copy_model(
            _s3_tier(args), _catalog(args).store().origin, args.name, on_progress=on_progress
        )
    print(f"pulled {args.name} from {args.url}: {copied / 1e6:.1f} MB received", file=out)
    return 0


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="installed name, alias, or directory")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=None, help="Ember's data directory (env EMBER_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream one answer to a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt without chat template")
    _add_engine_flags(gen)

    chat = sub.add_parser("chat", help="interactive chat with history")
    _add_engine_flags(chat)

    models = sub.add_parser("models", help="manage local models").add_subparsers(
        dest="models_command", required=True
    )
    add = models.add_parser("add", help="install a known model, or import a .gguf file")
    add.add_argument("source", help="a known model name (see `ember models list`) or a .gguf path")
    add.add_argument("--name", default=None, help="name for an imported .gguf")
    models.add_parser("list", help="installed and installable models")
    imp = models.add_parser(
        "import", help="import a Hugging Face model directory or a .safetensors file"
    )
    imp.add_argument("path")
    imp.add_argument("--name", default=None, help="catalog name (default: the dir's name)")
    rm = models.add_parser("rm", help="remove an installed model")
    rm.add_argument("name")
    show = models.add_parser("show", help="a model's manifest: tensors, chunks, codecs, sizes")
    show.add_argument("name")
    verify = models.add_parser("verify", help="check every stored copy of every chunk")
    verify.add_argument("name")
    for verb, helptext in (("push", "copy a model to S3"), ("pull", "copy a model from S3")):
        p = models.add_parser(verb, help=helptext)
        p.add_argument("name")
        p.add_argument("url", help="s3://bucket/prefix")
        p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    for p in (imp, *[models.choices[v] for v in ("push", "pull")]):
        p.add_argument(
            "--no-progress", dest="progress", action="store_false", help="no progress bar"
        )
    cli_billing.register(sub)
    cli_pool.register(sub)
    serve.register(sub)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
        "generate": cmd_generate,
        "add": cmd_models_add,
        "import": cmd_models_import,
        "list": cmd_models_list,
        "rm": cmd_models_rm,
        "show": cmd_models_show,
        "verify": cmd_models_verify,
        "push": cmd_models_push,
        "pull": cmd_models_pull,
    }
    try:
        if args.command == "chat":
            return cmd_chat(args, out, err, inp)
        if hasattr(args, "serve_handler"):
            return int(args.serve_handler(args, out, err))
        if hasattr(args, "pool_handler"):
            return int(args.pool_handler(args, out, err))
        if hasattr(args, "billing_handler"):
            return int(args.billing_handler(args, out, err))
        key = args.models_command if args.command == "models" else args.command
        return handlers[key](args, out, err)
    except EmberError as exc:
        print(f"error: {exc.message}", file=err)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
