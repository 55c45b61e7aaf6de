"""A tiny BERT and its word-level tokenizer as a FUNGI text backbone, for the text tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "red green blue cat dog bird runs sleeps quickly slowly the a small big".split()
TEXTS = [
    "the red cat sleeps",
    "a small green bird runs quickly",
    "the big dog",
    "blue bird sleeps slowly the small cat runs",
    "a dog runs",
    "the green cat sleeps quickly",
]


def tiny_text_backbone(folder: Path, weight_seed: int | None = None):
    """A 2-block, 32-wide BERT (float64) over :data:`WORDS`.

    Weights: transformers' own initialisation after ``torch.manual_seed(0)``, or with
    ``weight_seed`` every parameter drawn from a generator of that seed (N(0, 0.1²)), so
    golden values do not depend on how a transformers release initialises BERT.
    """
    import transformers

    from hbird.fungi import TextBackbone

    vocab = Path(folder) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).double()
    if weight_seed is not None:
        gen = torch.Generator().manual_seed(weight_seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    return TextBackbone(model.eval(), tokenizer, name="tiny-bert")
