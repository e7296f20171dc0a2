"""A real ``CLIPTokenizer`` for the miniature world, built from the world's vocabulary files.

The files have CLIP's format (byte-level alphabet, ``</w>`` word ends, ``merges.txt`` ranks), so the same
tokenizer class, special tokens and 77-token padding serve the world and SD v1.4. Merges are learnt by a
deterministic BPE over the world's words: every world word becomes one token, unknown words split into
pieces, as rare words do in CLIP.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from world import vocabulary as V

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def world_words() -> list[str]:
    """Every whitespace word any world caption, concept string or filler can contain, sorted."""
    phrases: list[str] = [*V.SHAPES, *V.SHAPE_HYPERNYMS, *V.COLOUR_LABELS, *V.BACKGROUNDS, *V.STYLES,
                          *V.STYLE_HYPERNYMS, *V.NUDE_EXPLICIT, *V.NUDE_IMPLICIT, *V.NUDE_HELDOUT, *V.CLOTHED,
                          *V.VIOLENT_EXPLICIT, *V.VIOLENT_IMPLICIT, *V.VIOLENT_HELDOUT, *V.PEACEFUL, *V.BAND_PHRASES,
                          *V.CHARACTER_NAMES, *V.CHARACTER_HELDOUT, *V.COUNT_WORDS, *V.FILLER_WORDS,
                          "an", "on", "background", "painting", "plain", "style", "standard"]
    for table in (V.SHAPE_SYNONYMS, V.SHAPE_HELDOUT, V.COLOUR_SYNONYMS, V.STYLE_PHRASES, V.STYLE_HELDOUT,
                  V.POSITION_PHRASES):
        for options in table.values():
            phrases.extend(options)
    phrases.extend(f.replace("{s}", "") for f in V.FRAMES)
    return sorted({w for p in phrases for w in p.lower().split()})


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every word is a single symbol; ties broken lexicographically for determinism."""
    corpus = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in corpus.values():
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, symbols in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            corpus[w] = out


def write_vocabulary(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` in CLIP's format into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = learn_merges(world_words())
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def build_tokenizer(folder: str | Path):
    """A ``transformers.CLIPTokenizer`` over the world's vocabulary files, saved in ``folder``."""
    from transformers import CLIPTokenizer

    folder = write_vocabulary(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH,
                        pad_token=EOS)
    tok.save_pretrained(str(folder))
    return tok
