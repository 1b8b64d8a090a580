"""``rwkv-stream train``: train an RWKV-4 or RWKV-7 model and its task heads in parallel mode, then evaluate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from rwkv_stream.heads import HeadSet
from rwkv_stream.train import data as D
from rwkv_stream.train import transcript
from rwkv_stream.train.loop import LoopConfig, Trainable, TrainModel, head_set, make_heads, output_name, train
from rwkv_stream.train.model import RWKV4, TrainConfig
from rwkv_stream.train.model7 import RWKV7, Train7Config

if TYPE_CHECKING:
    from rwkv_stream.tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=["transcript", "records"], default="records",
                   help="transcript: punctuation/case tags (+ classes) made from plain prose; "
                        "records: JSONL or spaCy DocBin with tags and/or cats")
    g.add_argument("--corpus", type=Path, help="transcript: folder with {train,test}.txt (+ .books.txt labels)")
    g.add_argument("--train", type=Path, help="records: training JSONL or .spacy file")
    g.add_argument("--eval", type=Path, help="held-out JSONL/.spacy (records) or text file (transcript)")
    g.add_argument("--group", type=int, default=40, help="transcript: paragraphs per training stream")
    g.add_argument("--eval-group", type=int, default=4, help="transcript: paragraphs per evaluation stream")
    g.add_argument("--marker-prob", type=float, default=0.5,
                   help="transcript: chance of an end marker after a paragraph inside a training stream")
    g.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="transcript: also train heads tagger+1..tagger+K, whose decision for a word waits for "
                        "k more words (kept in OUT/heads; the bundle ships tagger and classifier)")
    g = p.add_argument_group("model")
    g.add_argument("--family", choices=["rwkv4", "rwkv7"],
                   help="model family to train (default: --init's family, else rwkv4)")
    g.add_argument("--head-size", type=int, default=64, help="rwkv7: channels per head (n-embd a multiple)")
    g.add_argument("--init", help="start from this checkpoint or bundle, or 'shipped[:NAME]' (else from scratch)")
    g.add_argument("--init-heads", type=Path, action="append", metavar="DIR",
                   help="start the heads from these heads.json folders (repeatable; those of the same name and "
                        "labels; default: --init's own heads when it is a bundle), else they start fresh")
    g.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: --init's, else train a BPE)")
    g.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a newly trained BPE")
    g.add_argument("--n-embd", type=int, default=192)
    g.add_argument("--n-layer", type=int, default=5)
    g.add_argument("--chunk-len", type=int, default=16, help="WKV chunk length of the parallel mode")
    g.add_argument("--head-hidden", type=int, default=0, help="hidden layer size of the heads (0: linear)")
    g.add_argument("--freeze-model", action="store_true", help="train the heads only, on the frozen model")
    g.add_argument("--tag-head", default="tagger", metavar="NAME",
                   help="name of the trained tagging head (lookahead heads: NAME+k); e.g. to add it to a model "
                        "that has a 'tagger' already")
    g.add_argument("--cats-head", default="classifier", metavar="NAME", help="name of the trained classification head")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--ctx", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--lr-final", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--lm-weight", type=float, default=1.0)
    g.add_argument("--tag-weight", type=float, default=1.0)
    g.add_argument("--cat-weight", type=float, default=0.3)
    g.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget (LR schedule fits it)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, logs, model.pth, metrics")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1...")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 on a shared machine)")
    g.add_argument("--bundle", type=Path, help="also write a bundle here (fp16 weights, checksums)")
    g.add_argument("--name", default="model")
    g.add_argument("--model-version", default="0")
    p.set_defaults(handler=run)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    if getattr(args, "threads", 0) > 0:
        torch.set_num_threads(args.threads)
    check_inputs(args)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tok_path = prepare_tokenizer(args)
    from rwkv_stream.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    train_data, eval_data = load_datasets(args, tok)
    print(f"train: {len(train_data.docs)} streams, {train_data.n_tokens} tokens; tags {len(train_data.tag_labels)}"
          f" labels, classes {train_data.cat_labels}", file=sys.stderr)
    model = build_model(args, tok.vocab_size)
    device = pick_device(args.device)
    net = Trainable(model, make_heads(train_data, model.cfg.n_embd, args.head_hidden))
    load_init_heads(net, args)
    summary = train(net, train_data, loop_config(args), args.out, device, args.resume)
    net.cpu().eval()
    round_to_fp16(net.model)
    model.save_checkpoint(args.out / "model.pth")
    heads = head_set(net, shipped_fingerprint(model), head_names(args))
    heads.save(args.out / "heads")
    metrics = evaluate_run(net, eval_data, tok, majority_class(train_data)) if eval_data else {}
    metrics["training"] = {**training_info(args, model, train_data), **summary}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "training"}, indent=2))
    if args.bundle:
        shipped = HeadSet({n: h for n, h in heads.heads.items() if "+" not in n}, heads.model_fingerprint)
        write_run_bundle(args, model, tok_path, shipped, metrics)
    print(f"done in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


def check_inputs(args: argparse.Namespace) -> None:
    """Fail before any work on a missing input or clashing head names; ``--init`` resolved like every model
    source."""
    head_names(args)
    if args.task == "records" and args.train is None:
        raise SystemExit("--task records needs --train FILE (.jsonl or .spacy)")
    if args.task == "transcript" and args.corpus is None:
        raise SystemExit("--task transcript needs --corpus DIR (with train.txt; run scripts/make_corpus.sh)")
    if args.init is not None:
        from rwkv_stream.loading import resolve_source

        args.init = resolve_source(args.init)


def head_names(args: argparse.Namespace) -> dict[str, str]:
    """The user's names of the trained heads by role (``--tag-head``, ``--cats-head``); a bad name or two
    heads of one name is a one-line error."""
    names = {"tagger": getattr(args, "tag_head", "tagger"), "classifier": getattr(args, "cats_head", "classifier")}
    for option, name in (("--tag-head", names["tagger"]), ("--cats-head", names["classifier"])):
        if not name or name != name.strip() or "+" in name:
            raise SystemExit(f"{option} {name!r}: a head name must be non-empty, without surrounding spaces and "
                             "without '+' (NAME+k names the lookahead heads)")
    if names["tagger"] == names["classifier"]:
        raise SystemExit(f"--tag-head and --cats-head both name head {names['tagger']!r}: give the two heads "
                         "different names")
    return names


def loop_config(args: argparse.Namespace) -> LoopConfig:
    return LoopConfig(
        steps=args.steps, batch_size=args.batch_size, ctx=args.ctx, lr=args.lr, lr_final=args.lr_final,
        warmup=args.warmup, lm_weight=args.lm_weight, tag_weight=args.tag_weight, cat_weight=args.cat_weight,
        freeze_model=args.freeze_model, checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
        seed=args.seed,
    )


# ------------------------------------------------------------------------------------------ tokenizer / data


def prepare_tokenizer(args: argparse.Namespace) -> Path:
    """The run's ``tokenizer.json``: given, from ``--init``'s bundle, already in OUT, or trained now."""
    target = args.out / "tokenizer.json"
    source = args.tokenizer
    if source is None and args.init is not None and (Path(args.init) / "tokenizer.json").exists():
        source = Path(args.init) / "tokenizer.json"
    if source is not None:
        target.write_bytes(Path(source).read_bytes())
    elif not target.exists():
        D.train_tokenizer(training_texts(args), args.vocab_size, target)
    return target


def training_texts(args: argparse.Namespace) -> list[str]:
    if args.task == "transcript":
        return [transcript.normalize(line) for line in D.read_lines(corpus_file(args, "train.txt"))]
    return [r["text"] for r in D.read_records(args.train)]


def corpus_file(args: argparse.Namespace, name: str) -> Path:
    if args.corpus is None:
        raise SystemExit("--task transcript needs --corpus DIR (with train.txt; run scripts/make_corpus.sh)")
    return args.corpus / name


def load_datasets(args: argparse.Namespace, tok: Tokenizer) -> tuple[D.Dataset, D.Dataset | None]:
    if args.task == "transcript":
        return _transcript_datasets(args, tok)
    if args.train is None:
        raise SystemExit("--task records needs --train FILE (.jsonl or .spacy)")
    train_data = D.records_dataset(D.read_records(args.train), tok)
    eval_data: D.Dataset | None = None
    if args.eval:
        eval_data = D.records_dataset(D.read_records(args.eval), tok, train_data.tag_labels, train_data.cat_labels)
    return train_data, eval_data


def _transcript_datasets(args: argparse.Namespace, tok: Tokenizer) -> tuple[D.Dataset, D.Dataset]:
    books = corpus_file(args, "train.books.txt")
    train_data = D.transcript_dataset(corpus_file(args, "train.txt"), tok, args.group, books,
                                      marker_prob=args.marker_prob, seed=args.seed,
                                      lookahead=getattr(args, "lookahead", 0))
    eval_text = args.eval or corpus_file(args, "test.txt")
    eval_books = eval_text.with_name(eval_text.stem + ".books.txt")
    return train_data, D.transcript_dataset(eval_text, tok, args.eval_group, eval_books, train_data.cat_labels)


def majority_class(data: D.Dataset) -> str | None:
    counts = Counter(d.cats[-1] for d in data.docs if d.cats and d.cats[-1] != D.IGNORE)
    return data.cat_labels[counts.most_common(1)[0][0]] if counts else None


# ------------------------------------------------------------------------------------------ model


def build_model(args: argparse.Namespace, vocab_size: int) -> TrainModel:
    family = getattr(args, "family", None)
    if args.init is None:
        if family == "rwkv7":
            if args.n_embd % args.head_size:
                raise SystemExit(f"--n-embd {args.n_embd} is not a multiple of --head-size {args.head_size}")
            return RWKV7(Train7Config(vocab_size, args.n_embd, args.n_layer, head_size=args.head_size,
                                      chunk_len=args.chunk_len))
        return RWKV4(TrainConfig(vocab_size, args.n_embd, args.n_layer, chunk_len=args.chunk_len))
    from rwkv_stream.checkpoint import load_canonical

    init = Path(args.init)
    weights = init / "model.safetensors" if (init / "bundle.json").exists() else init
    tensors, config = load_canonical(weights)
    if family is not None and config.family != family:
        raise SystemExit(f"--init {args.init} is an {config.family} model, not {family}")
    model: TrainModel
    if config.family == "rwkv7":
        model = RWKV7.from_state_dict(tensors, args.chunk_len)
    else:
        model = RWKV4.from_state_dict(tensors, args.chunk_len)
    if model.cfg.vocab_size < vocab_size:
        raise SystemExit(f"--init has {model.cfg.vocab_size} embeddings, the tokenizer {vocab_size} ids")
    return model


@torch.no_grad()
def load_init_heads(net: Trainable, args: argparse.Namespace) -> None:
    """Copy into the new heads the weights of same-named, same-spec heads of ``--init-heads`` folders (default:
    the ``--init`` bundle's own heads), so a fine-tune does not relearn its heads from scratch."""
    dirs = list(getattr(args, "init_heads", None) or [])
    if not dirs and args.init is not None and (Path(args.init) / "heads.json").exists():
        dirs = [Path(args.init)]
    names = head_names(args)
    for directory in dirs:
        loaded = HeadSet.load(directory)
        for role, head in net.head_modules().items():
            name = output_name(role, names)
            if name in loaded and loaded[name].spec() == head.spec():
                head.load_state_dict(loaded[name].state_dict())
                print(f"head {name} starts from {directory}", file=sys.stderr)


@torch.no_grad()
def round_to_fp16(model: TrainModel) -> None:
    """Round the matrices as the bundle stores them (fp16), so metrics describe the shipped weights."""
    for p in model.parameters():
        if p.dim() == 2:
            p.copy_(p.half().float())


def shipped_tensors(model: TrainModel) -> dict[str, torch.Tensor]:
    """The engine's canonical tensors (vectors flattened, fp32) with fp16 matrices, as a bundle stores them."""
    from rwkv_stream.checkpoint import infer_config, validate

    sd = model.checkpoint_state_dict()
    tensors = validate(sd, infer_config(sd))
    return {k: v.half() if v.dim() == 2 else v for k, v in tensors.items()}


def shipped_fingerprint(model: TrainModel) -> str:
    from rwkv_stream.checkpoint import infer_config
    from rwkv_stream.model import weights_fingerprint

    tensors = shipped_tensors(model)
    return weights_fingerprint(tensors, infer_config(tensors))


def training_info(args: argparse.Namespace, model: TrainModel, data: D.Dataset) -> dict:
    family = "rwkv7" if isinstance(model, RWKV7) else "rwkv4"
    return {"task": args.task, "family": family, **model.cfg.to_dict(), "ctx": args.ctx, "batch_size": args.batch_size,
            "lr": args.lr, "train_tokens": data.n_tokens, "seed": args.seed,
            "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}


def evaluate_run(net: Trainable, eval_data: D.Dataset, tok: Tokenizer, majority: str | None) -> dict:
    from rwkv_stream.train.evaluate import evaluate, training_hidden_fn

    end_id = D.WordEncoder(tok).end[0]
    heads = net.head_modules()
    lm = None if net.model is None else net.model.head
    model = cast(RWKV4, net.model)  # either family: training_hidden_fn only calls forward_hidden(ids, state)
    with torch.no_grad():
        return evaluate(eval_data, training_hidden_fn(model), lm, heads, tok, end_id, majority)


def write_run_bundle(args: argparse.Namespace, model: TrainModel, tok_path: Path, heads: HeadSet,
                     metrics: dict) -> None:
    from rwkv_stream.bundle import write_bundle

    write_bundle(args.bundle, shipped_tensors(model), tok_path, heads, name=args.name,
                 model_version=args.model_version, weights_dtype=torch.float16, info=metrics)
    print(f"bundle written to {args.bundle}", file=sys.stderr)
