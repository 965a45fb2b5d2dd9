"""The ``rotalabs-steer`` command: extract, inspect, sweep and export steering vectors.

    rotalabs-steer extract --model default --pairs refusal --layers 10-14 --out vectors/
    rotalabs-steer info vectors/
    rotalabs-steer sweep vectors/ --model default --layer 12 --strengths -4,0,4
    rotalabs-steer export-gguf vectors/ refusal.gguf

``--model`` is ``default`` (the bundled SmolLM2-135M-Instruct), a model folder, or the name of a
model already in the local Hugging Face cache: nothing is downloaded. Every error is one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

PROG = "rotalabs-steer"
EXIT_ERROR = 2
# Options whose values may start with "-" ("-4,0,4"), which argparse would take for an option.
_SIGNED_OPTIONS = ("--layers", "--layer", "--strengths")


class _UsageError(Exception):
    """A bad command line or input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(message)  # argparse would print the usage as well, over several lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(_attach_signed_values(argv))
        args.run(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (_UsageError, ValueError, TypeError, IndexError, KeyError, OSError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def _attach_signed_values(argv: list[str]) -> list[str]:
    """``--strengths -4,0,4`` becomes ``--strengths=-4,0,4``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _SIGNED_OPTIONS and i + 1 < len(argv) and re.match(r"-[^-]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# --- argument types ------------------------------------------------------------------------------


def _layer_list(text: str) -> list[int]:
    """``"10-14"``, ``"3,5,7"``, ``"10-12,20"`` or ``"-1"``: layer indices."""
    layers = []
    for item in text.split(","):
        item = item.strip()
        if re.fullmatch(r"-?\d+", item):
            layers.append(int(item))
        elif match := re.fullmatch(r"(\d+)-(\d+)", item):
            start, end = int(match[1]), int(match[2])
            if start > end:
                raise argparse.ArgumentTypeError(f"layer range {item!r} runs backwards")
            layers.extend(range(start, end + 1))
        else:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a layer: give N, a range N-M, or a comma list of them (10-14,20)")
    return layers


def _strength_list(text: str) -> list[float]:
    try:
        strengths = [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers (-4,0,4)") from None
    if not all(math.isfinite(s) for s in strengths):
        raise argparse.ArgumentTypeError(f"{text!r}: strengths must be finite")
    return strengths


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch build has no usable {device.type} device "
                                         f"(torch {torch.__version__}); use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: only {count} {device.type} device(s) are visible")
    return device


# --- the parser ------------------------------------------------------------------------------------


def _parser() -> _Parser:
    from .extraction.batching import TOKEN_POSITIONS
    from .extraction.statistics import METHODS

    parser = _Parser(prog=PROG, description="Steering vectors for Hugging Face language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_options(command: _Parser) -> None:
        command.add_argument("--model", default="default", metavar="PATH|NAME|default",
                             help="'default' (bundled SmolLM2-135M-Instruct), a model folder, or a model "
                                  "name in the local Hugging Face cache (default: %(default)s)")
        command.add_argument("--device", type=_device, default="cpu", help="torch device (default: %(default)s)")
        command.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                             help="texts per forward pass (default: %(default)s)")

    extract = commands.add_parser("extract", help="extract steering vectors and save them with a plot",
                                  description="Extract steering vectors (CAA by default) at several layers in "
                                              "one batched pass; save the set and layers.png into --out.")
    model_options(extract)
    extract.add_argument("--pairs", required=True, metavar="FILE|BEHAVIOUR",
                         help="contrast pairs: a JSON/JSONL file or a shipped behaviour name")
    extract.add_argument("--behavior", metavar="NAME",
                         help="behaviour name stored with vectors from a --pairs file (default: the file's own)")
    extract.add_argument("--layers", type=_layer_list, metavar="LAYERS",
                         help="e.g. 10-14, 3,5,7 or 10-12,20 (default: the model's recommended layers)")
    extract.add_argument("--token-position", choices=TOKEN_POSITIONS, default="last",
                         help="token whose activation is read (default: %(default)s)")
    extract.add_argument("--method", choices=METHODS, default="caa",
                         help="caa: mean difference; pca / pca_diff: top principal direction of the paired "
                              "differences (uncentred / centred); fisher: shrunk LDA direction; the last three "
                              "are unit-norm (default: %(default)s)")
    extract.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the set into")
    extract.set_defaults(run=_run_extract)

    info = commands.add_parser("info", help="show a saved set", description="Show a saved set's metadata.")
    info.add_argument("directory", type=Path, metavar="DIR")
    info.set_defaults(run=_run_info)

    sweep = commands.add_parser("sweep", help="measure a vector's effect across strengths",
                                description="Steer with one vector of a saved set at several strengths; "
                                            "print the behaviour score and coherence of each.")
    sweep.add_argument("directory", type=Path, metavar="DIR")
    model_options(sweep)
    sweep.add_argument("--layer", type=int, metavar="N",
                       help="layer of the vector (default: the best held-out separation)")
    sweep.add_argument("--strengths", type=_strength_list, default=[-4.0, 0.0, 4.0], metavar="S,S,...",
                       help="comma list of strengths (default: -4,0,4)")
    sweep.add_argument("--relative", action="store_true",
                       help="strengths in units of the layer's mean activation norm (e.g. -0.3,0,0.3)")
    sweep.add_argument("--behavior", metavar="NAME",
                       help="what to score and whose held-out prompts to use (default: the set's behaviour)")
    prompts = sweep.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", type=Path, metavar="FILE",
                         help="prompts: a file written by EvaluationDataset.save (default: the shipped ones)")
    prompts.add_argument("--ab", type=Path, metavar="FILE", help="CAA A/B items (JSON or JSONL) instead of prompts")
    sweep.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                       help="greedy tokens generated per prompt (default: %(default)s)")
    sweep.add_argument("--plot", type=Path, metavar="PNG", help="also save a plot of the sweep")
    sweep.set_defaults(run=_run_sweep)

    export = commands.add_parser("export-gguf", help="write a set as a llama.cpp control vector",
                                 description="Write a saved set as a llama.cpp / repeng control-vector GGUF "
                                             "file: the vector of layer i becomes direction.i.")
    export.add_argument("directory", type=Path, metavar="DIR")
    export.add_argument("output", type=Path, metavar="OUT.gguf")
    export.add_argument("--model-hint", metavar="TEXT", help="controlvector.model_hint (default: the model name)")
    export.set_defaults(run=_run_export)
    return parser


# --- commands ------------------------------------------------------------------------------------


def _run_extract(args) -> None:
    from .configs import infer_model_config
    from .extraction import extract_vectors

    if args.out.exists() and not args.out.is_dir():
        raise _UsageError(f"--out {args.out} exists and is not a folder")
    pairs = _load_pairs(args.pairs, args.behavior)
    model, tokenizer = _load_model(args.model, args.device)
    layers = args.layers or infer_model_config(model).get_recommended_layers(pairs.behavior)
    vectors = extract_vectors(model, tokenizer, pairs, layers, args.method, args.token_position,
                              batch_size=args.batch_size)
    vectors.save(args.out)
    print(_table(["layer", "norm", "accuracy", "cohens_d"], [
        [v.layer_index, v.norm, v.metadata.get("separation_accuracy"), v.metadata.get("separation_cohens_d")]
        for v in vectors]))
    print(f"saved {len(vectors)} {vectors.behavior} vectors ({len(pairs)} pairs) to {args.out}/")
    _save_plot(lambda plots: plots.plot_layer_metrics(vectors), args.out / "layers.png")
    for vector in vectors:
        if vector.held_out_projections is not None and len(vector.held_out_projections["positive"]):
            _save_plot(lambda plots, v=vector: plots.plot_held_out_projections(v),
                       args.out / f"projections_layer{vector.layer_index}.png")


def _run_info(args) -> None:
    from .vectors import SteeringVectorSet

    vectors = SteeringVectorSet.load(args.directory)
    print(f"behavior: {vectors.behavior}")
    print(f"model:    {vectors.model_name}")
    print(f"layers:   {', '.join(map(str, vectors.layers))}")
    print(_table(["layer", "dim", "norm", "method", "pairs", "token", "accuracy", "cohens_d", "created"], [
        [v.layer_index, v.dim, v.norm, v.extraction_method, v.metadata.get("num_pairs"),
         v.metadata.get("token_position"), v.metadata.get("separation_accuracy"),
         v.metadata.get("separation_cohens_d"), v.metadata.get("created_at")]
        for v in vectors]))


def _run_sweep(args) -> None:
    from .datasets import EvaluationDataset, load_caa_ab, load_evaluation_prompts
    from .evaluation import SCORED_BEHAVIORS, score_strengths
    from .steering import _activation_norm
    from .vectors import SteeringVectorSet

    vectors = SteeringVectorSet.load(args.directory)
    vector = _pick_vector(vectors, args.layer)
    if args.relative:  # the injector's own check, before the model loads
        try:
            _activation_norm(vector, "--relative")
        except ValueError:
            raise _UsageError(f"--relative: the layer-{vector.layer_index} vector in {args.directory} records "
                              "no activation_norm (extract it again with this version)") from None
    behavior = args.behavior or vectors.behavior
    # Inputs are checked before the model loads, which takes longest.
    for option, path in (("--prompts", args.prompts), ("--ab", args.ab)):
        if path is not None and not path.is_file():
            raise _UsageError(f"{option} {path}: no such file")
    if args.ab is None:
        if behavior not in SCORED_BEHAVIORS:
            raise _UsageError(f"behaviour {behavior!r} has no built-in score on free-text prompts (scored: "
                              f"{', '.join(SCORED_BEHAVIORS)}); pass --behavior or A/B items with --ab")
        prompts = EvaluationDataset.load(args.prompts) if args.prompts else load_evaluation_prompts(behavior)
    model, tokenizer = _load_model(args.model, args.device)
    if args.ab is not None:
        prompts = load_caa_ab(args.ab, behavior, tokenizer if getattr(tokenizer, "chat_template", None) else None)
    rows = score_strengths(model, tokenizer, vector, args.strengths, prompts, behavior, args.max_new_tokens,
                           batch_size=args.batch_size, show_progress=True, relative=args.relative)
    keys = [key for key in rows[0] if key != "generations"]
    print(f"{behavior} vector of layer {vector.layer_index} (norm {vector.norm:.3f}), {len(prompts)} prompts")
    print(_table(keys, [[row[key] for key in keys] for row in rows]))
    print("first prompt's continuation by strength:")
    for row in rows:
        print(f"  {row['strength']:+g}: {row['generations'][0][:120]!r}")
    if args.plot is not None:
        _save_plot(lambda plots: plots.plot_strength_sweep(rows), args.plot)


def _run_export(args) -> None:
    from .gguf_export import export_gguf
    from .vectors import SteeringVectorSet

    vectors = SteeringVectorSet.load(args.directory)
    export_gguf(vectors, args.output, model_hint=args.model_hint)
    print(f"wrote {len(vectors)} directions ({', '.join(f'direction.{i}' for i in vectors.layers)}) "
          f"to {args.output}")


# --- helpers -------------------------------------------------------------------------------------


def _load_model(spec: str, device):
    if spec == "default":
        from .bundled_model import load_default

        model, tokenizer = load_default()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = Path(spec).expanduser()
        if not source.is_dir():
            if spec.startswith(("/", ".", "~")):
                raise _UsageError(f"--model {spec}: no such model folder")
            source = spec  # a model name, looked up in the local Hugging Face cache
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise OSError(f"--model {spec}: not a loadable model folder nor a model in the local "
                          f"Hugging Face cache ({e})") from None
    return model.to(device).eval(), tokenizer


def _load_pairs(spec: str, behavior: str | None):
    from .datasets import BEHAVIORS, load_behavior_pairs, load_pairs

    if spec in BEHAVIORS:
        return load_behavior_pairs(spec)
    if Path(spec).is_file():
        return load_pairs(spec, behavior)
    raise _UsageError(f"--pairs {spec!r} is neither a file nor a shipped behaviour ({', '.join(BEHAVIORS)})")


def _pick_vector(vectors, layer: int | None):
    if layer is not None:
        if layer not in vectors:
            raise _UsageError(f"--layer {layer}: the set has layers {vectors.layers}")
        return vectors[layer]
    try:
        return vectors.get_best("separation")
    except ValueError:
        raise _UsageError(f"the set has no separation figures to pick a layer by; pass --layer "
                          f"(one of {vectors.layers})") from None


def _save_plot(draw, path: Path) -> None:
    try:
        from . import plots

        figure = draw(plots)
    except ImportError as e:
        print(f"{PROG}: note: {e}; no plot written", file=sys.stderr)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plots._pyplot().close(figure)
    print(f"plot: {path}")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths))
                     for line in [headers, *cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
