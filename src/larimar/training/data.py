"""Training episodes for the Larimar adapter (paper Eq. 1): generic text, never edits.

An *episode* is E items written to memory together. Each item is a (query, continuation) pair whose
concatenation is a chunk of at most `max_tokens` decoder tokens:

- text chunks: a sentence (or short run of sentences) from a directory of .txt files, split at a random
  50-90 % word boundary: at edit time a query lacks the part of the fact that memory must supply;
- fact sentences (optional, `facts` source): PARAREL patterns over T-REx facts with objects shuffled
  drawn at random from each relation's object pool, so the decoder can only get the object from memory, never from its own
  knowledge; the continuation is the object. Subjects that occur in the evaluation sets (CounterFact,
  ZsRE) are dropped, so no edit content enters training.

Documents (WikiText articles, novel chapters, relations for facts) are split into train / validation by a
stable hash, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_WIKI_HEADING = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class Item:
    query: str
    continuation: str  # starts with a space unless empty
    kind: str  # "text" | "fact"
    ask: str | None = None  # the query a reader asks with, when it is not `query` (a rephrasing)

    @property
    def text(self) -> str:
        return self.query + self.continuation

    @property
    def asked(self) -> str:
        """The query used to read this item back (`ask`, else the written `query`)."""
        return self.query if self.ask is None else self.ask


def detokenise_wikitext(text: str) -> str:
    """Undo WikiText's spaced punctuation (' @-@ ', ' , ', ' . ') well enough for training text."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?)\]'])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = text.replace(" 's", "'s").replace(" n't", "n't").replace('" ', '"')
    return re.sub(r"\s+", " ", text).strip()


def read_documents(root: str | Path) -> list[tuple[str, str]]:
    """(doc_id, text) pairs from every .txt / .raw file under `root`.

    WikiText files split at top-level headings (' = Title = '); other files split at 'CHAPTER' lines
    (novels) or are one document each.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".raw") and p.name != "README")
    if not files:
        raise FileNotFoundError(f"{root}: no .txt or .raw files found")
    docs = []
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        rel = str(path.relative_to(root))
        if "wikitext" in rel.lower() or path.suffix == ".raw":
            current, title = [], "preamble"
            for line in raw.splitlines():
                if _WIKI_HEADING.match(line):
                    if current:
                        docs.append((f"{rel}#{title}", detokenise_wikitext(" ".join(current))))
                    current, title = [], line.strip(" =")
                elif line.strip() and not line.strip().startswith("="):
                    current.append(line)
            if current:
                docs.append((f"{rel}#{title}", detokenise_wikitext(" ".join(current))))
        else:
            parts = re.split(r"\n\s*CHAPTER [^\n]*\n", raw)
            for i, part in enumerate(parts):
                text = re.sub(r"\s+", " ", part).strip()
                if text:
                    docs.append((f"{rel}#{i}", text))
    return docs


def is_validation(doc_id: str, fraction: float) -> bool:
    h = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < fraction * 10_000


def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    out = []
    for s in _SENT.split(text):
        s = s.strip()
        n = len(s.split())
        if min_words <= n <= max_words and "<unk>" not in s and not s.startswith("="):
            out.append(s)
    return out


def split_item(sentence: str, rng: random.Random, lo: float = 0.5, hi: float = 0.9) -> Item:
    words = sentence.split(" ")
    cut = max(1, min(len(words) - 1, round(len(words) * rng.uniform(lo, hi))))
    return Item(" ".join(words[:cut]), " " + " ".join(words[cut:]), "text")


# ---------------------------------------------------------------------------------------------- facts
def _eval_records(data_root: Path) -> list[dict]:
    """Every record of the evaluation sets (CounterFact and ZsRE JSON files under `data_root`)."""
    records: list[dict] = []
    for path in list((data_root / "counterfact").glob("*.json")) + list((data_root / "zsre").glob("*.json")):
        try:
            records += json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return records


def _eval_subjects(data_root: Path) -> set[str]:
    """Lower-cased subjects of the evaluation sets."""
    subjects = (r.get("subject") or (r.get("requested_rewrite") or {}).get("subject") for r in _eval_records(data_root))
    return {s.strip().lower() for s in subjects if s}


def _eval_answers(data_root: Path) -> set[str]:
    """Lower-cased answers of the evaluation sets (CounterFact new/true objects, ZsRE alt/answers)."""
    answers: set[str] = set()
    for r in _eval_records(data_root):
        rw = r.get("requested_rewrite") or {}
        found = [(rw.get("target_new") or {}).get("str"), (rw.get("target_true") or {}).get("str")]
        found += [r.get("alt"), r.get("target_new")] + list(r.get("answers") or [])
        answers.update(a.strip().lower() for a in found if isinstance(a, str) and a.strip())
    return answers


_SPAN_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'&.-]*[A-Za-z0-9]|[A-Za-z0-9]")


def word_spans(texts: list[str], n: int, seed: int = 0, *, exclude: set[str] | None = None) -> list[str]:
    """Up to `n` distinct word spans of `texts` (generic documents), to be used as open objects.

    Half are runs of 1-4 capitalised words (names, titles: "Battle of Hastings" gives the runs
    "Battle" and "Hastings"), half random runs of 1-3 words, so that an output path trained on them
    learns to spell many strings, not a few hundred entity names. Spans whose lower-cased form is in
    `exclude` are dropped. Deterministic for a given `seed` and text order.
    """
    if n <= 0:
        return []
    rng = random.Random(seed)
    exclude = exclude or set()
    names: set[str] = set()
    phrases: set[str] = set()
    for text in texts:
        words = _SPAN_WORD.findall(text.replace("--", " "))
        run: list[str] = []
        for w in words + [""]:
            if w[:1].isupper() and len(run) < 4:
                run.append(w)
                continue
            if run:
                names.add(" ".join(run))
            run = [w] if w[:1].isupper() else []
        for _ in range(len(words) // 8):
            i = rng.randrange(len(words))
            span = words[i : i + rng.randint(1, 3)]
            if "unk" not in span:  # WikiText's <unk>
                phrases.add(" ".join(span))
    name_list = sorted(x for x in names if x.lower() not in exclude)
    phrase_list = sorted(x for x in phrases - names if x.lower() not in exclude)
    rng.shuffle(name_list)
    rng.shuffle(phrase_list)
    out = name_list[: n // 2]
    return out + phrase_list[: n - len(out)]


def corpus_spans(
    text_root: str | Path,
    n: int,
    seed: int = 0,
    *,
    exclude_eval_from: str | Path | None = None,
    val_fraction: float = 0.05,
    exclude: set[str] | None = None,
) -> list[str]:
    """`word_spans` of the *training* documents under `text_root`, without the subjects and answers of
    the evaluation sets under `exclude_eval_from` (and the lower-cased strings in `exclude`)."""
    docs = [t for d, t in read_documents(text_root) if not is_validation(d, val_fraction)]
    banned = set(exclude or ())
    if exclude_eval_from:
        banned |= _eval_subjects(Path(exclude_eval_from)) | _eval_answers(Path(exclude_eval_from))
    return word_spans(docs, n, seed, exclude=banned)


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")


def synthetic_dates(n: int, seed: int = 0, years: tuple[int, int] = (1000, 2029)) -> list[str]:
    """`n` generic dates "D Month YYYY" (day 1-28, any month, a year in `years`), drawn with `seed`.

    Dates are where a token code's tokens recur most (" 19 March 1982": " ", "1", "9" twice), and word
    spans of the training text hold few; like the years 1000-2029 they name no fact.
    """
    if n < 0:
        raise ValueError(f"synthetic_dates: n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(*years)}" for _ in range(n)]


@dataclass
class Relation:
    """One PARAREL relation: cloze patterns (text before the object), subjects, and its object pool."""

    patterns: list[str]
    subjects: list[str]
    objects: list[str]
    question: str | None = None  # a question template ("What is the capital of [X]?"), if one is known
    unknown_prob: float = 0.0  # chance that a drawn object is the word "unknown" (what forgetting writes)
    open_objects: list[str] | None = None  # object_pool "mixed": half of the draws come from here

    def _object(self, rng: random.Random) -> str:
        pool = self.objects
        if self.open_objects and rng.random() < 0.5:  # no extra draw unless mixed
            pool = self.open_objects
        obj = rng.choice(pool)
        if self.unknown_prob > 0 and rng.random() < self.unknown_prob:  # no extra draw when 0
            return UNKNOWN_OBJECT
        return obj

    def sample(self, rng: random.Random) -> Item:
        # object drawn afresh at every draw: no subject->object mapping exists to memorise
        pattern, subject, obj = rng.choice(self.patterns), rng.choice(self.subjects), self._object(rng)
        return Item(pattern.replace("[X]", subject), " " + obj, "fact")

    def sample_with_rephrase(self, rng: random.Random, question_prob: float = 0.0) -> tuple[Item, str]:
        """A fact item and the same fact asked with another pattern (a paraphrased query), if the relation has one.

        With probability `question_prob` (relations with a question template only) the item asks the
        question ("Which country is X located in? France.") and the rephrasing is a cloze pattern.
        """
        pattern, subject, obj = rng.choice(self.patterns), rng.choice(self.subjects), self._object(rng)
        others = [p for p in self.patterns if p != pattern]
        other = rng.choice(others) if others else pattern
        if self.question is not None and question_prob > 0 and rng.random() < question_prob:
            return Item(self.question.replace("[X]", subject), " " + obj, "fact"), pattern.replace("[X]", subject)
        return Item(pattern.replace("[X]", subject), " " + obj, "fact"), other.replace("[X]", subject)


def load_question_templates(path: str | Path) -> dict[str, str]:
    """relation id -> question template with one '[X]' (a JSON object, e.g. templates/question_templates.json)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"question templates {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"question templates {path}: expected a JSON object relation id -> template")
    return {str(k): v.strip() for k, v in raw.items() if isinstance(v, str) and v.count("[X]") == 1}


def question_items(
    pararel_root: str | Path,
    question_templates: str | Path,
    values: list[str],
    *,
    seed: int = 0,
    exclude_eval_from: str | Path | None = None,
) -> list[tuple[str, str]]:
    """(question, value) pairs: each value answers a PARAREL relation's question about one of its
    subjects ("Which country is X located in?", value), relations and subjects drawn at random
    (evaluation subjects under `exclude_eval_from` removed). The values are arbitrary strings: these
    are counterfactual facts, as edits are."""
    exclude = _eval_subjects(Path(exclude_eval_from)) if exclude_eval_from else set()
    relations = [r for r in load_relations(pararel_root, exclude_subjects=exclude, question_templates=question_templates).values() if r.question]
    if not relations:
        raise ValueError(f"question_items: no PARAREL relation under {pararel_root} has a question template")
    rng = random.Random(seed)
    out = []
    for value in values:
        r = rng.choice(relations)
        out.append((r.question.replace("[X]", rng.choice(r.subjects)), value))
    return out


OBJECT_POOLS = ("relation", "open", "mixed")
UNKNOWN_OBJECT = "unknown"


def load_relations(
    pararel_root: str | Path,
    *,
    exclude_subjects: set[str] | None = None,
    question_templates: str | Path | None = None,
    object_pool: str = "relation",
    unknown_prob: float = 0.0,
    extra_open: list[str] | None = None,
) -> dict[str, Relation]:
    """relation id -> Relation, from PARAREL patterns ending in '[Y].' and T-REx facts (and question
    templates from `question_templates`, a JSON file relation id -> template, where given).

    `object_pool`: "relation" draws each fact's object from its relation's own objects (a closed set
    per relation: an output path can learn it as a classifier); "open" draws it from every entity
    name of every relation (subjects and objects) plus the years 1000-2029, so the object must be
    read from memory, whatever it is; "mixed" draws half of the objects each way.
    `unknown_prob`: the chance that a fact's object is the word "unknown" instead, so that a decoder
    learns to read that word back too (forgetting and leakage prevention write "{prompt} unknown.").
    `extra_open`: further strings for the open pool (e.g. `word_spans` of the text corpus); needs
    `object_pool` "open" or "mixed".
    """
    if object_pool not in OBJECT_POOLS:
        raise ValueError(f"object_pool must be one of {OBJECT_POOLS}, got {object_pool!r}")
    if not 0.0 <= unknown_prob < 1.0:
        raise ValueError(f"unknown_prob must be in [0, 1), got {unknown_prob}")
    if extra_open and object_pool == "relation":
        raise ValueError('extra_open objects need object_pool "open" or "mixed"')
    root = Path(pararel_root)
    exclude = exclude_subjects or set()
    questions = load_question_templates(question_templates) if question_templates else {}
    out: dict[str, Relation] = {}
    for pat_file in sorted((root / "graphs_json").glob("P*.jsonl")):
        facts_file = root / "trex_lms_vocab" / pat_file.name
        if not facts_file.is_file():
            continue
        patterns = []
        for line in pat_file.read_text().splitlines():
            if not line.strip():
                continue
            p = json.loads(line)["pattern"].strip()
            if p.endswith("[Y].") and p.count("[X]") == 1 and "[Y]" not in p[:-4]:
                patterns.append(p[:-4].rstrip())
        facts = [json.loads(x) for x in facts_file.read_text().splitlines() if x.strip()]
        subjects = sorted({f["sub_label"] for f in facts if f["sub_label"].strip().lower() not in exclude})
        objects = sorted({f["obj_label"] for f in facts})
        if patterns and subjects and len(objects) > 1:
            out[pat_file.stem] = Relation(patterns, subjects, objects, questions.get(pat_file.stem), unknown_prob)
    if object_pool != "relation" and out:
        pool = {x for r in out.values() for x in r.subjects + r.objects} | {str(y) for y in range(1000, 2030)}
        pool = sorted(pool | set(extra_open or ()))
        for r in out.values():
            if object_pool == "open":
                r.objects = pool
            else:
                r.open_objects = pool
    return out


class EpisodeSampler:
    """Draws episodes of E items from text chunks and (optionally) fact sentences."""

    def __init__(
        self,
        text_root: str | Path | None,
        pararel_root: str | Path | None = None,
        *,
        split: str = "train",
        val_fraction: float = 0.05,
        fact_fraction: float = 0.5,
        seed: int = 0,
        exclude_eval_from: str | Path | None = None,
        question_templates: str | Path | None = None,
        object_pool: str = "relation",
        unknown_prob: float = 0.0,
        open_text_spans: int = 0,
        rephrase_prob: float = 0.0,
        question_prob: float = 0.0,
        distractor_prob: float = 0.0,
    ):
        """`open_text_spans` > 0: that many `word_spans` of the *training* documents under `text_root`
        join the open object pool (answers and subjects of the evaluation sets under
        `exclude_eval_from` removed); facts then need `object_pool` "open" or "mixed".
        `rephrase_prob`: chance that a fact item is asked (`Item.ask`) with another pattern of its
        relation; `question_prob`: chance that a fact of a relation with a question template is
        written as that question (`Relation.sample_with_rephrase`); `distractor_prob`: chance that a fact
        is asked after an unrelated sentence of the corpus, as CounterFact's paraphrase prompts are
        ("<sentence>. Danielle Darrieux, a native"). All 0: the draws of earlier versions."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.rng = random.Random(seed + (0 if split == "train" else 1))
        self.texts: list[str] = []
        if text_root is not None:
            for doc_id, text in read_documents(text_root):
                if is_validation(doc_id, val_fraction) == (split == "val"):
                    self.texts.extend(sentences(text))
        self.relations: list[Relation] = []
        if pararel_root is not None and fact_fraction > 0:
            exclude = _eval_subjects(Path(exclude_eval_from)) if exclude_eval_from else set()
            spans = None
            if open_text_spans > 0:
                if text_root is None:
                    raise ValueError("open_text_spans needs text_root")
                spans = corpus_spans(text_root, open_text_spans, seed, exclude_eval_from=exclude_eval_from, val_fraction=val_fraction)
            relations = load_relations(
                pararel_root, exclude_subjects=exclude, question_templates=question_templates, object_pool=object_pool,
                unknown_prob=unknown_prob, extra_open=spans,
            )
            for rel, relation in relations.items():
                if is_validation("pararel#" + rel, val_fraction * 2) == (split == "val"):
                    self.relations.append(relation)
        self.rephrase_prob, self.question_prob, self.distractor_prob = rephrase_prob, question_prob, distractor_prob
        self.fact_fraction = fact_fraction if self.relations else 0.0
        if not self.texts and not self.relations:
            raise ValueError("EpisodeSampler: no training material found (check text_root / pararel_root)")
        if not self.texts:
            self.fact_fraction = 1.0

    def item(self) -> Item:
        if self.rng.random() < self.fact_fraction:
            relation = self.rng.choice(self.relations)
            if self.rephrase_prob <= 0 and self.question_prob <= 0 and self.distractor_prob <= 0:
                return relation.sample(self.rng)
            item, other = relation.sample_with_rephrase(self.rng, self.question_prob)
            if self.rng.random() < self.rephrase_prob:
                item = replace(item, ask=other)
            if self.texts and self.distractor_prob > 0 and self.rng.random() < self.distractor_prob:
                item = replace(item, ask=self.rng.choice(self.texts) + " " + item.asked)
            return item
        return split_item(self.rng.choice(self.texts), self.rng)

    def episode(self, size: int) -> list[Item]:
        return [self.item() for _ in range(size)]

    def text_chunk(self) -> Item:
        """A plain text item (for the language-model regulariser)."""
        if not self.texts:
            return self.rng.choice(self.relations).sample(self.rng)
        return split_item(self.rng.choice(self.texts), self.rng)
