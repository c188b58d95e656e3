"""Read-out fidelity of auto-associative vs keyed writes as the memory fills (no decoder involved).

Writes N CounterFact facts "{prompt} {target_new}." in one shot, reads with each fact's prompt (and
with its first paraphrase prompt), and reports how much of the way from the query's own latent q to
the fact's latent z the read-out z_r goes: recovery = 1 - ||z_r - z|| / ||q - z|| (1: the read-out is
the fact; 0: no closer than the query itself, e.g. a memory that reads every query back as itself).
The nearest-written-fact accuracy of z_r is reported too, but it says little on its own: q is
already closest to its own fact. Auto-associative: W from the facts' own latents (the paper).
Keyed: W from the prompts' latents (`Larimar.write(texts, keys=prompts)`).

    python scripts/keyed_capacity.py [--model DIR] [--out reports/keyed_capacity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default="../shared/data/counterfact/counterfact-rome.json")
    p.add_argument("--sizes", default="16,128,256,384,512,1024")
    p.add_argument("--ridges", default="0.001,1.0")
    p.add_argument("--queried", type=int, default=128)
    p.add_argument("--out", default="reports/keyed_capacity.json")
    a = p.parse_args()

    from larimar.eval.data import load_counterfact_rome
    from larimar.memory import MemoryState
    from larimar.modeling.model import Larimar

    sizes = [int(s) for s in a.sizes.split(",")]
    model = Larimar.from_pretrained(a.model)
    cases = load_counterfact_rome(a.data, n=max(sizes))
    with torch.no_grad():
        Zf = model.encoder([f"{c.prompt} {c.target_new}." for c in cases]).double()  # (N, C) facts
        Zp = model.encoder([c.prompt for c in cases]).double()  # prompts (the keys)
        Zq = model.encoder([c.paraphrase_prompts[0] for c in cases]).double()  # unseen paraphrases
    M0 = model.M0.detach().double()

    def recovery(z_r: torch.Tensor, q: torch.Tensor, z: torch.Tensor) -> float:
        return float((1 - (z_r - z).norm(dim=-1) / (q - z).norm(dim=-1)).mean())

    def nn_acc(z_r: torch.Tensor, Z: torch.Tensor) -> float:
        sim = torch.nn.functional.normalize(z_r, dim=-1) @ torch.nn.functional.normalize(Z, dim=-1).T
        return float((sim.argmax(-1) == torch.arange(z_r.shape[0])).double().mean())

    rows = []
    for lam in [float(x) for x in a.ridges.split(",")]:
        empty = MemoryState.init(M0, lam=lam)
        for N in sizes:
            k = min(N, a.queried)
            for mode in ("auto", "keyed"):
                st = empty.write(Zf[:N], None if mode == "auto" else empty.address(Zp[:N]))
                rp, rq = st.read(Zp[:k]), st.read(Zq[:k])
                rows.append({
                    "ridge": lam, "N": N, "write": mode,
                    "prompt_recovery": recovery(rp, Zp[:k], Zf[:k]),
                    "paraphrase_recovery": recovery(rq, Zq[:k], Zf[:k]),
                    "prompt_nn_acc": nn_acc(rp, Zf[:N]),
                    "paraphrase_nn_acc": nn_acc(rq, Zf[:N]),
                })
                print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"K": model.config.memory_size, "C": model.config.latent_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
