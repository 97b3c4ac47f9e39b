"""``maskedattn demo``: watch attention learn to look back.

A small GPT is trained on the induction task: a random sequence of syllables, then the same
sequence again. The second half can only be predicted by looking back at the first: find where
the current syllable appeared before and copy what came after it. Two heads working together
learn exactly that (Olsson et al. 2022): a *previous-token* head in the first layer, which lets
each position know its predecessor, and an *induction* head in the second, which attends to the
position just after the earlier copy of the current token. The demo measures accuracy before and
after, finds those heads by their attention patterns, and draws them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..data.tasks import Induction, accuracy
from ..model import GPT, GPTConfig
from ._formation import Formation

# 16 consonants x 4 vowels: 64 short, distinct labels for the task's tokens.
SYLLABLES = [c + v for c in "bdfghjklmnprstvz" for v in "aeiou"[:4]]
LENGTH = 16  # syllables per half of a sequence


def add_parser(subparsers) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo",
        help="train a tiny GPT on the induction task and show the heads that learn to look back",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="maskedattn-demo",
                   help="directory for the pictures, the page and the model"
                   " (default: ./maskedattn-demo)")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def model_config() -> GPTConfig:
    """Two layers, four heads, rotary positions: a shape in which induction heads form fast."""
    return GPTConfig.preset("tiny", vocab_size=len(SYLLABLES), context=Induction(
        len(SYLLABLES), LENGTH).seq_len, n_layer=2, n_head=4, n_embd=64, positions="rope")


def task_accuracy(model: GPT, task: Induction, seed: int) -> float:
    """Accuracy on the repeated half of 256 fresh sequences."""
    batch = task.sample(256, torch.Generator().manual_seed(seed + 7))
    model.eval()
    with torch.no_grad():
        acc = accuracy(model(batch.tokens).logits, batch.targets)
    model.train()
    return acc


def run(args: argparse.Namespace) -> int:
    """Train, measure, capture, draw; then tell the user what to open."""
    from ..train.config import TrainConfig
    from ..train.loop import train
    from ..viz import head_scores, page_extras, plot_grid, plot_head, save_figure, write_html
    from ..viz.capture import capture_attention
    from .demo_heads import repeat_start, write_understanding

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    # Matrices this small are faster on one thread: splitting them costs more than it saves,
    # and far more when other programs keep the cores busy.
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = Induction(vocab_size=len(SYLLABLES), length=LENGTH)
    config = model_config()
    train_config = TrainConfig(
        out=str(out / "run"), task="induction", task_size=LENGTH,
        model=tuple(sorted(config.to_dict().items())), steps=args.steps, batch_size=32,
        lr=3e-3, min_lr=3e-4, warmup=min(20, args.steps), weight_decay=0.01,
        eval_every=max(5, args.steps // 24), eval_batches=4, keep=1, seed=args.seed,
        track_heads=True,  # the role scores of every head at each evaluation: formation.png
    )
    torch.manual_seed(args.seed)  # the same initial weights that train() starts from
    before = task_accuracy(GPT(config), task, args.seed)
    print(f"Training a {config.n_layer}-layer, {config.n_head}-head GPT on sequences of random"
          f" syllables in which a segment of {LENGTH - LENGTH // 4} to {LENGTH} syllables"
          f" repeats ({args.steps} steps).")
    print(f"Before training: {before:.0%} of the repeat predicted"
          f" (chance: 1 in {len(SYLLABLES)}).")
    formation = Formation(Path(train_config.out))
    model = train(train_config, progress=not args.no_progress, on_eval=formation.on_eval).model
    after = task_accuracy(model, task, args.seed)
    print(f"After training:  {after:.0%} of the repeat predicted.")

    sample = task.sample(1, torch.Generator().manual_seed(args.seed + 11))
    example = sample.tokens
    mark = (repeat_start(sample), "the repeat starts")
    labels = [SYLLABLES[i] for i in example[0].tolist()]
    model.eval()
    with torch.no_grad(), capture_attention(model) as cap:
        model(example)
    maps = cap.maps(labels, token_ids=example[0].tolist())
    scores = head_scores(maps)
    model.save_pretrained(out / "model")

    induction = scores.ranked("induction", threshold=0.4)
    previous = scores.ranked("previous_token", threshold=0.4)
    save_figure(plot_grid(maps, mark=mark), out / "attention-grid.png")
    pictures = ["attention-grid.png"]
    for found, name in ((induction, "induction-head.png"),
                        (previous, "previous-token-head.png")):
        if found:
            layer, head, _ = found[0]
            save_figure(plot_head(maps, layer, head, mark=mark), out / name)
            pictures.append(name)
    write_html(maps, out / "attention.html", title="maskedattn demo: induction heads",
               extras=page_extras(model, example[0], SYLLABLES.__getitem__), mark=mark)
    (out / "heads.txt").write_text(scores.table() + "\n")
    (out / "heads.json").write_text(json.dumps(scores.to_dict(), indent=1))

    print()
    print("Heads that learned to look back (score >= 0.4; 1.0 = all attention on the pattern):")
    if not induction and not previous:
        print("  none yet: train longer (--steps) and look again.")
    for layer, head, s in previous:
        print(f"  layer {layer} head {head}: previous-token head (score {s:.2f}), each token"
              " attends to the one just before it")
    for layer, head, s in induction:
        print(f"  layer {layer} head {head}: induction head (score {s:.2f}), in the repeat each"
              " token attends to the token after its earlier copy")
    understood = write_understanding(model, task, sample, labels, scores, induction, out,
                                     args.seed)
    print()
    print(f"Written to {out}/:")
    print("  attention.html           open it in a browser (works offline): pick a layer and a"
          " head,\n                           hover a token of the second half to see where it"
          " looks")
    for name in pictures:
        print(f"  {name:<24} " + {
            "attention-grid.png": "every head's map; rows are queries, columns keys",
            "induction-head.png": "an off-diagonal stripe: each token looks one step past its"
                                  " earlier copy",
            "previous-token-head.png": "a line just below the diagonal: each token looks at its"
                                       " predecessor",
        }[name])
    print("  heads.txt, heads.json    role scores of every head")
    if understood:
        print("  steps.html               the five steps of the induction head, real numbers;"
              " ablation.json: the numbers above")
    print(f"  model/                   the trained model: maskedattn viz --model {out}/model"
          " ...")
    print("  run/                     checkpoints, metrics.jsonl and loss.png of the training")
    formation.write(out, example, labels)
    return 0
