#!/usr/bin/env python3
"""Generate the golden fixture for the Rust metrics (model/src/metrics): BLEU and ROUGE.

NOT run in CI. The output is committed as model/tests/fixtures/metrics_golden.json and checked by
model/tests/metrics_golden.rs.

Re-run (needs sacrebleu 2.x, rouge-score 0.1.2 and its nltk):
    pip install sacrebleu rouge-score
    python3 scripts/golden/gen_metrics.py [--data /work/shared/data/kjv_web/validation.jsonl] \
        [--out model/tests/fixtures/metrics_golden.json]

Contents:
  pairs     list of {"hyp", "ref"}: ~200 KJV -> WEB pairs from validation.jsonl (KJV source as the
            hypothesis, WEB target as the reference: realistic partial overlap) followed by
            hand-made edge cases (empty sides, punctuation, numbers, quotes, apostrophes, hyphens,
            unicode, whitespace, HTML entities, case, clipping, very short segments where the
            higher-order n-gram counts are zero so the 'exp' smoothing matters, stemming).
  cases     named corpora (lists of pair indices), each with
              bleu: sacrebleu.corpus_bleu(hyps, [refs]) defaults: score, precisions, bp, sys_len,
                    ref_len, counts, totals
              rouge_stem / rouge_nostem: mean over examples of rouge-score F1 (x100) for rouge1,
                    rouge2, rougeL with use_stemmer True / False
  examples  per-example rouge-score (precision, recall, fmeasure) for a subset of pairs, both
            stemmer settings
  tokenize  seeded random strings built from tricky pieces (punctuation, digits, entities, unusual
            whitespace, case-changing unicode) with sacreBLEU's 13a tokenization (of s.rstrip(), as
            corpus_bleu does) and rouge-score's default tokenization, without and with stemming
  stems     {word: nltk PorterStemmer().stem(word)} for every [a-z0-9]+ token longer than 3
            characters in the data file (what rouge-score would stem), plus tricky words
"""

import argparse
import importlib.metadata
import json
import random
import re
import sys

import nltk
import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

N_KJV = 200

EDGE_CASES = [
    # (name, hypothesis, reference)
    ("empty_hyp", "", "In the beginning God created the heavens and the earth."),
    ("empty_ref", "In the beginning God created the heaven and the earth.", ""),
    ("both_empty", "", ""),
    ("identical", "And God said, Let there be light: and there was light.",
     "And God said, Let there be light: and there was light."),
    ("identical_short", "Jesus wept.", "Jesus wept."),
    ("three_tokens", "a b c", "a b d"),
    ("four_tokens_smoothing", "the cat sat down", "the cat lay down"),
    ("one_token_match", "Amen", "Amen"),
    ("no_match", "xyz qqq", "abc def ghi"),
    ("punctuation_heavy", "Wait... what?!? (Really) -- yes; no: maybe!!! [sic] {x} <y> @#$%^&*",
     "Wait -- what?! (Really?) yes; no... maybe! [sic] {x} <y> @#$%^&*"),
    ("numbers", "He paid 3,000 shekels and 1.5 talents in 1999-2000; about 12.5% (i.e. 0.125).",
     "He paid 3000 shekels, and 1.5 talents in 1999 - 2000, about 12,5 % i.e. .125."),
    ("number_edges", "3. 4, 5.6.7 8,9,10 .5 ,5 5. 5, -3 3-", "3 . 4 , 5.6.7 8,9,10 . 5 , 5 5 . 5 , - 3 3 -"),
    ("quotes", '"Come," he said, "follow me." \'Yes,\' she said.',
     "\u201cCome,\u201d he said, \u201cfollow me.\u201d \u2018Yes,\u2019 she said."),
    ("apostrophes", "the LORD's house isn't far; o' the seas' edge", "Yahweh\u2019s house is not far; o the seas edge"),
    ("hyphens", "the well-known first-born son of 10-20 men -- and more - too",
     "the well known firstborn son of 10 - 20 men, and more-too"),
    ("unicode", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u65e5\u672c\u8a9e \U0001f600 done",
     "Cafe naive resume - \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u65e5\u672c \u8a9e \U0001f600 done"),
    ("unicode_case", "\u0130stanbul \u212aelvin STRASSE Stra\u00dfe \u00c9COLE", "istanbul kelvin strasse strasse ecole"),
    ("whitespace", "  tab\tseparated\u00a0nbsp\u2009thin \x1cfs  line-\nbroken\nnext  ",
     "tab separated nbsp thin fs linebroken next"),
    ("html_entities", "&quot;x&quot; &amp; y &lt;z&gt; &amp;lt; <skipped> end", "\"x\" & y <z> &lt; end"),
    ("case_only", "The LORD said unto Moses", "the lord said unto moses"),
    ("clipping", "the the the the the the the", "the cat is on the mat"),
    ("stemming", "The children were running and jumped happily over generously painted fences",
     "the child runs and jumps happy over the generous paint on the fence"),
    ("stemmer_words", "relational conditional digitizer conformably differently analogously vietnamization "
     "predication operator feudalism decisiveness hopefulness callousness formality sensitivity sensibility "
     "triplicate formative formalize electricity electrical hopeful goodness revival allowance inference "
     "airliner gyroscopic adjustable defensible irritant replacement adjustment dependent adoption communism "
     "activate angularity homologous effective bowdlerize probate rate cease controlling rolling dying lying "
     "skies news innings proceed generally analogy fully cries died spied flies agreed feed bleed yyyy syzygy",
     "relate condition digitize conform different analog vietnam predicate operate feudal decisive hope "
     "callous formal sensitive sensible triplic form formal electric electric hope good revive allow infer "
     "airline gyroscope adjust defense irritate replace adjust depend adopt commune active angular homolog "
     "effect bowdler probat rated ceased controlled rolled died lied sky new inning proceeds general analog "
     "full cried dies spy fly agree fed bled yyyi syzygi"),
    ("long_hyp_short_ref", "and it came to pass that the people went out and gathered and they came back again",
     "the people gathered"),
    ("short_hyp_long_ref", "the people gathered",
     "and it came to pass that the people went out and gathered and they came back again"),
    ("trailing_tokenized_period", "Then he left .", "Then he left."),
]

TRICKY_WORDS = (
    "caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated troubled sized hopping "
    "tanned falling hissing fizzed failing filing happy sky enjoy relational conditional rational valenci "
    "hesitanci digitizer conformabli radicalli differentli vileli analogousli vietnamization predication operator "
    "feudalism decisiveness hopefulness callousness formaliti sensitiviti sensibiliti triplicate formative "
    "formalize electriciti electrical hopeful goodness revival allowance inference airliner gyroscopic adjustable "
    "defensible irritant replacement adjustment dependent adoption homologou communism activate angulariti "
    "homologous effective bowdlerize probate rate cease controll roll dying lying tying skies news innings inning "
    "outings outing cannings canning howe proceed exceed succeed generously analogi fulli cries died spied tried "
    "flies 1990s abyy yyyy syzygy bleed generalli ieds eeds oyed owing ying yyed bying ease ease eased beyond "
    "allli logically hopefulli"
).split()

# Pieces for random tokenizer strings: everything the 13a regexes and the rouge-score tokenizer
# treat specially, including Python-only whitespace (U+001C..U+001F), NBSP, U+2009, U+3000, U+0085,
# a zero-width space (NOT whitespace), and characters whose lowercase is ASCII (U+0130, U+212A).
TOKENIZE_PIECES = list("abcXYZ019.,-'\"&;<>!?()[]{}~`^_|\\/:@#$%*+= \t\n") + [
    "\xa0", "\x1c", "\x1f", "\u00e9", "\u0130", "\u212a", "\u00df", "\u2014", "&quot;", "&amp;", "&lt;",
    "<skipped>", "-\n", "..", "3,000", "1.5", "word", "running", "\u2009", "\u3000", "\x85", "\u200b",
    "\ufb01", "\u216b", "\u00b2",
]
N_TOKENIZE = 300


def tokenize_records():
    rng = random.Random(1234)
    t13 = Tokenizer13a()
    plain, stemmed = tokenizers.DefaultTokenizer(False), tokenizers.DefaultTokenizer(True)
    out = []
    for _ in range(N_TOKENIZE):
        s = "".join(rng.choice(TOKENIZE_PIECES) for _ in range(rng.randint(0, 25)))
        out.append({"s": s, "13a": t13(s.rstrip()), "rouge": plain.tokenize(s), "rouge_stem": stemmed.tokenize(s)})
    return out


def bleu_record(hyps, refs):
    b = sacrebleu.corpus_bleu(hyps, [refs])
    return {
        "score": b.score,
        "precisions": list(b.precisions),
        "bp": b.bp,
        "sys_len": b.sys_len,
        "ref_len": b.ref_len,
        "counts": list(b.counts),
        "totals": list(b.totals),
    }


SCORERS = {
    stem: rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem) for stem in (True, False)
}


def rouge_example(hyp, ref, stem):
    # rouge-score's argument order is score(target, prediction).
    s = SCORERS[stem].score(ref, hyp)
    return {k: [s[k].precision, s[k].recall, s[k].fmeasure] for k in ("rouge1", "rouge2", "rougeL")}


def rouge_mean(hyps, refs, stem):
    scores = [rouge_example(h, r, stem) for h, r in zip(hyps, refs)]
    return {k: 100.0 * sum(s[k][2] for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/kjv_web/validation.jsonl")
    ap.add_argument("--out", default="model/tests/fixtures/metrics_golden.json")
    args = ap.parse_args()

    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pairs = [{"hyp": r["source"], "ref": r["target"]} for r in rows[:N_KJV]]
    kjv = list(range(len(pairs)))
    edge_start = len(pairs)
    for name, h, r in EDGE_CASES:
        pairs.append({"name": name, "hyp": h, "ref": r})
    edges = list(range(edge_start, len(pairs)))

    corpora = [
        ("kjv_first10", kjv[:10]),
        ("kjv_first50", kjv[:50]),
        (f"kjv_all{len(kjv)}", kjv),
        ("kjv_odd_reversed", kjv[::-2]),
        ("edges_all", edges),
        ("kjv_and_edges", kjv + edges),
    ]
    corpora += [(f"edge_{pairs[i]['name']}", [i]) for i in edges]
    # The same hypotheses scored with hypothesis and reference swapped (different BP regime).
    swapped_start = len(pairs)
    for i in kjv[:50]:
        pairs.append({"name": f"swapped_{i}", "hyp": pairs[i]["ref"], "ref": pairs[i]["hyp"]})
    corpora.append(("kjv_first50_swapped", list(range(swapped_start, len(pairs)))))

    cases = []
    for name, idx in corpora:
        hyps = [pairs[i]["hyp"] for i in idx]
        refs = [pairs[i]["ref"] for i in idx]
        cases.append({
            "name": name,
            "indices": idx,
            "bleu": bleu_record(hyps, refs),
            "rouge_stem": rouge_mean(hyps, refs, True),
            "rouge_nostem": rouge_mean(hyps, refs, False),
        })

    examples = []
    for i in kjv[:10] + edges:
        p = pairs[i]
        examples.append({"index": i, "stem": rouge_example(p["hyp"], p["ref"], True),
                         "nostem": rouge_example(p["hyp"], p["ref"], False)})

    stemmer = porter.PorterStemmer()
    words = set(TRICKY_WORDS)
    for r in rows:
        for text in (r["source"], r["target"]):
            words.update(t for t in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if len(t) > 3)
    stems = {w: stemmer.stem(w) for w in sorted(words)}

    sig_metric = sacrebleu.BLEU()
    sig_metric.corpus_score(["x"], [["x"]])  # the signature needs the reference count

    out = {
        "generator": {
            "script": "scripts/golden/gen_metrics.py",
            "python": sys.version.split()[0],
            "sacrebleu": sacrebleu.__version__,
            "rouge_score": importlib.metadata.version("rouge-score"),
            "nltk": nltk.__version__,
            "bleu_signature": str(sig_metric.get_signature()),
        },
        "pairs": pairs,
        "cases": cases,
        "examples": examples,
        "tokenize": tokenize_records(),
        "stems": stems,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(pairs)} pairs, {len(cases)} cases, {len(examples)} examples, {len(stems)} stems")


if __name__ == "__main__":
    main()
