"""How much CounterFact's paraphrase prompts lose to their opening sentence.

Each case's fact is written alone; each of its paraphrase prompts ("<unrelated sentence>. Danielle
Darrieux, a native") is scored with memory forced on, as given and with its first sentence cut.
Prints the share where P(new object) > P(true object), per adapter.

    python scripts/distractor_probe.py src/larimar/assets/default runs/stage2/s6 --n 60
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="adapter directories")
    p.add_argument("--data", default=os.path.join(os.environ.get("LARIMAR_DATA", "../shared/data"), "counterfact", "counterfact-rome.json"))
    p.add_argument("--n", type=int, default=60)
    args = p.parse_args()
    from larimar import Larimar
    from larimar.eval.data import load_counterfact_rome
    from larimar.eval.sequential import fact_sentence

    cases = load_counterfact_rome(args.data, n=args.n)
    for path in args.models:
        m = Larimar.from_pretrained(path)
        res: dict[str, list[float]] = {"as given": [], "first sentence cut": []}
        for c in cases:
            new, true = " " + c.target_new, " " + c.target_true
            m.reset_memory()
            m.write_facts([fact_sentence(c)], [c.prompt])
            for q in c.paraphrase_prompts:
                bare = q.split(". ", 1)[1] if ". " in q else q
                for key, text in (("as given", q), ("first sentence cut", bare)):
                    nll = m.score([text], [new, true], use_memory="always")[0]
                    res[key].append(float(nll[0] < nll[1]))
        print(path, {k: round(100 * sum(v) / len(v), 1) for k, v in res.items()}, flush=True)


if __name__ == "__main__":
    main()
