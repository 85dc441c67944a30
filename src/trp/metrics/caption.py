"""Caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr) through pycocoevalcap, plus exact match.

The scorers and the PTB tokenisation are those lmms-eval's RefCOCO region-caption tasks use
(``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` then ``Bleu(4)``, ``Meteor()``,
``Rouge()``, ``Cider()`` on ``{id: [captions]}`` dicts). The tokenizer and METEOR run Java
(``java`` on ``PATH``; ``make setup`` installs it where missing). CIDEr's document frequencies
come from the references of the evaluated set, so it depends on the whole set, as in COCO.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence

__all__ = [
    "CAPTION_METRIC_NAMES",
    "caption_metrics",
    "exact_match",
    "normalize_answer",
    "require_java",
]

CAPTION_METRIC_NAMES: tuple[str, ...] = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def require_java() -> str:
    """The ``java`` executable, or a ``RuntimeError`` saying how to get it."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "pycocoevalcap's PTB tokenizer and METEOR need Java: install a JRE "
            "(`make setup` does: apt-get install default-jre-headless) or pass tokenize=False "
            "and leave METEOR out of `metrics`"
        )
    return java


def _references(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences, not a single str")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("caption metrics need at least one caption")
    refs = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise TypeError(f"prediction {i} must be a str, got {type(p).__name__}")
        r = [r] if isinstance(r, str) else list(r)
        if not r or not all(isinstance(x, str) for x in r):
            raise ValueError(f"reference {i} must be a str or a non-empty list of str")
        refs.append(r)
    return refs


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    metrics: Sequence[str] = CAPTION_METRIC_NAMES,
    tokenize: bool = True,
) -> dict[str, float]:
    """Corpus-level caption scores of ``predictions`` against their ``references``.

    Args:
        predictions: one generated caption per sample.
        references: one reference (str) or several (list of str) per sample.
        metrics: a subset of ``CAPTION_METRIC_NAMES``.
        tokenize: PTB-tokenise both sides first (Java; lmms-eval does). ``False`` splits on
            whitespace after lower-casing and removing punctuation.

    Returns:
        ``{"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}`` (those asked for) as floats; BLEU-4 is the
        corpus BLEU of pycocoevalcap (``Bleu(4)``'s 4th score), the others its means.
    """
    unknown = [m for m in metrics if m not in CAPTION_METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {CAPTION_METRIC_NAMES}")
    refs = _references(predictions, references)
    gts = dict(enumerate(refs))
    res = {i: [p] for i, p in enumerate(predictions)}
    if tokenize:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        require_java()
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in gts.items()})
        res = tok.tokenize({i: [{"caption": c} for c in r] for i, r in res.items()})
    else:
        gts = {i: [_plain(c) for c in r] for i, r in gts.items()}
        res = {i: [_plain(c) for c in r] for i, r in res.items()}
    out: dict[str, float] = {}
    for name in metrics:
        out[name] = _score(name, gts, res)
    return out


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _score(name: str, gts: dict, res: dict) -> float:
    if name == "BLEU-4":
        from pycocoevalcap.bleu.bleu import Bleu

        score, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return float(score[3])
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor

        require_java()
        scorer = Meteor()
        try:
            score, _ = scorer.compute_score(gts, res)
        finally:
            _stop(scorer)
        return float(score)
    if name == "ROUGE-L":
        from pycocoevalcap.rouge.rouge import Rouge

        score, _ = Rouge().compute_score(gts, res)
        return float(score)
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(gts, res)
    return float(score)


def _stop(scorer: object) -> None:
    """End METEOR's Java subprocess (pycocoevalcap 1.2 only stops it in ``__del__``)."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        proc.kill()
        proc.wait()


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: ``" A red Circle. "`` ->
    ``"a red circle"`` (what exact match compares)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return " ".join(text.lower().split()).strip(" .,;:!?")


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references after :func:`normalize_answer`."""
    refs = _references(predictions, references)
    hits = [
        normalize_answer(p) in {normalize_answer(x) for x in r} for p, r in zip(predictions, refs)
    ]
    return sum(hits) / len(hits)
