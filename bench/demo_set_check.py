"""Checks of the built-in federation demo set (``fededit_core/data/federation_demo.jsonl``).

    python -m bench.demo_set_check                 # both checks (z takes a few minutes on a CPU)
    python -m bench.demo_set_check --no-z          # only check 1

1. Does the unedited model know the facts? For every record the mean per-token NLL of
   ``" " + target_true`` after the prompt must be below that of ``" " + target_new`` (metrics.target_nll
   adds the leading space itself), and the same on every neighbourhood prompt; greedy generation
   starting with target_true and the paraphrases are reported as well (not required).
2. How alike are the MEMIT target vectors z (and delta = z - h) of the clients? Prints the cosine
   summary within each client, within the related pairs (client-0/client-1, client-2/client-3) and
   across them, and for each ordered client pair (a, b) the fraction of a's z whose best-match
   cosine with b's set exceeds alpha. With the re-edit rule "a keeps b's set when at least half of
   a's z have best-match cosine > alpha", a keeps b exactly when alpha < crit(a, b), the
   ceil(n_a/2)-th largest best-match cosine; the alphas that keep every related pair and reject every
   unrelated one are [max crit(unrelated), min crit(related)), when that interval is not empty.
   The raw matrices go to ``results/engine/federation_demo_z_cosine.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from fededit_core.model.loading import DEFAULT_MODEL

DATA = Path(__file__).resolve().parents[1] / "fededit_core" / "data" / "federation_demo.jsonl"
OUT = Path(__file__).resolve().parents[1] / "results" / "engine" / "federation_demo_z_cosine.json"
ALPHAS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
RELATED = {("client-0", "client-1"), ("client-1", "client-0"), ("client-2", "client-3"), ("client-3", "client-2")}


def read_clients(path: Path) -> list[str]:
    return [json.loads(line)["client"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- check 1


def check_knowledge(model, tok, requests, clients) -> bool:
    from fededit_core.eval.metrics import generate_greedy, target_nll

    prompts = [r.text for r in requests]
    nll_true = target_nll(model, tok, prompts, [r.target_true for r in requests])
    nll_new = target_nll(model, tok, prompts, [r.target_new for r in requests])
    gens = generate_greedy(model, tok, prompts, max_new_tokens=6)

    nb_prompts, nb_true, nb_new, nb_of = [], [], [], []
    pp_prompts, pp_true, pp_new, pp_of = [], [], [], []
    for i, r in enumerate(requests):
        for p in r.neighborhood_prompts:
            nb_prompts.append(p), nb_true.append(r.locality_target), nb_new.append(r.target_new), nb_of.append(i)
        for p in r.paraphrase_prompts:
            pp_prompts.append(p), pp_true.append(r.target_true), pp_new.append(r.target_new), pp_of.append(i)
    nb_t, nb_n = target_nll(model, tok, nb_prompts, nb_true), target_nll(model, tok, nb_prompts, nb_new)
    pp_t, pp_n = target_nll(model, tok, pp_prompts, pp_true), target_nll(model, tok, pp_prompts, pp_new)

    print("Check 1: the unedited model prefers target_true over target_new (mean per-token NLL of ' '+target)")
    print(f"{'case':<14} {'client':<9} {'nll_true':>8} {'nll_new':>8} ok  greedy  nbhd  para | prompt -> greedy")
    n_ok = n_greedy = 0
    for i, r in enumerate(requests):
        ok = bool(nll_true[i] < nll_new[i])
        cont = gens[i][len(prompts[i]) :]
        greedy = cont.strip().startswith(r.target_true)
        nb = [bool(nb_t[j] < nb_n[j]) for j, k in enumerate(nb_of) if k == i]
        pp = [bool(pp_t[j] < pp_n[j]) for j, k in enumerate(pp_of) if k == i]
        n_ok += ok
        n_greedy += greedy
        print(
            f"{r.case_id:<14} {clients[i]:<9} {float(nll_true[i]):8.2f} {float(nll_new[i]):8.2f} "
            f"{'Y ' if ok else 'N '}  {'Y' if greedy else 'n':<6}  {sum(nb)}/{len(nb)}   {sum(pp)}/{len(pp)}  "
            f"| {prompts[i]} ->{cont!r}"
        )
    nb_ok = int((nb_t < nb_n).sum())
    pp_ok = int((pp_t < pp_n).sum())
    print()
    print("Neighbourhood prompts (target_true must beat target_new):")
    for j, p in enumerate(nb_prompts):
        flag = "ok " if nb_t[j] < nb_n[j] else "BAD"
        print(f"  {flag} {float(nb_t[j]):5.2f} {float(nb_n[j]):5.2f}  {p} -> {nb_true[j]} (vs {nb_new[j]})")
    print()
    print(f"prompt:        {n_ok}/{len(requests)} prefer target_true (need >= {len(requests) - 2})")
    print(f"greedy:        {n_greedy}/{len(requests)} generations start with target_true")
    print(f"neighbourhood: {nb_ok}/{len(nb_prompts)} prefer target_true (need all)")
    print(f"paraphrase:    {pp_ok}/{len(pp_prompts)} prefer target_true (informative)")
    passed = n_ok >= len(requests) - 2 and nb_ok == len(nb_prompts)
    print(f"CHECK 1 {'PASSED' if passed else 'FAILED'}")
    return passed


# --------------------------------------------------------------------------- check 2


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x @ x.T


def block_stats(cos: torch.Tensor, rows: list[int], cols: list[int]) -> dict:
    same = rows == cols
    vals = [float(cos[i, j]) for i in rows for j in cols if not (same and i == j)]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


def best_match(cos: torch.Tensor, rows: list[int], cols: list[int]) -> list[float]:
    return [max(float(cos[i, j]) for j in cols) for i in rows]


def summarise(name: str, cos: torch.Tensor, groups: dict[str, list[int]]) -> dict:
    names = sorted(groups)
    out: dict = {"blocks": {}, "alpha_table": {}, "crit": {}}
    blocks = [(f"within {c}", groups[c], groups[c]) for c in names]
    blocks += [
        ("client-0 x client-1", groups["client-0"], groups["client-1"]),
        ("client-2 x client-3", groups["client-2"], groups["client-3"]),
        ("pair01 x pair23", groups["client-0"] + groups["client-1"], groups["client-2"] + groups["client-3"]),
    ]
    print(f"\n{name}: cosine similarity (off-diagonal)")
    print(f"  {'block':<22} {'mean':>7} {'min':>7} {'max':>7}")
    for label, rows, cols in blocks:
        s = block_stats(cos, rows, cols)
        out["blocks"][label] = s
        print(f"  {label:<22} {s['mean']:7.3f} {s['min']:7.3f} {s['max']:7.3f}")

    print(
        f"\n{name}: fraction of a's vectors whose best-match cosine with b's set > alpha "
        f"(crit = the alpha below which a keeps b)"
    )
    print(f"  {'a -> b':<22} {'rel':<4}" + "".join(f"{a:>6}" for a in ALPHAS) + f"{'crit':>8}   best-match cosines")
    for a in names:
        for b in names:
            if a == b:
                continue
            bm = best_match(cos, groups[a], groups[b])
            fracs = [sum(v > alpha for v in bm) / len(bm) for alpha in ALPHAS]
            crit = sorted(bm, reverse=True)[math.ceil(len(bm) / 2) - 1]
            key = f"{a}->{b}"
            out["alpha_table"][key] = dict(zip(map(str, ALPHAS), fracs))
            out["crit"][key] = crit
            rel = "yes" if (a, b) in RELATED else "no"
            print(
                f"  {key:<22} {rel:<4}"
                + "".join(f"{f:6.2f}" for f in fracs)
                + f"{crit:8.3f}   "
                + " ".join(f"{v:.3f}" for v in sorted(bm, reverse=True))
            )
    related = [v for k, v in out["crit"].items() if tuple(k.split("->")) in RELATED]
    unrelated = [v for k, v in out["crit"].items() if tuple(k.split("->")) not in RELATED]
    lo, hi = max(unrelated), min(related)
    out["separating_interval"] = [lo, hi] if lo < hi else None
    if lo < hi:
        print(f"  => alpha in [{lo:.3f}, {hi:.3f}) keeps every related pair and rejects every unrelated one")
        fits = [alpha for alpha in ALPHAS if lo <= alpha < hi]
        print(f"     grid alphas that do: {fits if fits else 'none'}")
    else:
        print(f"  => no alpha separates: lowest related crit {hi:.3f} <= highest unrelated crit {lo:.3f}")
    return out


def check_z(editor, requests, clients) -> dict:
    res = editor.compute_z(requests)
    print(
        f"\nCheck 2: MEMIT z of {len(requests)} requests: z {tuple(res.z.shape)} at layer "
        f"{editor.hp.z_layer}, {res.seconds:.0f} s, final target prob "
        f"min {min(res.target_prob):.2f} mean {sum(res.target_prob) / len(res.target_prob):.2f}"
    )
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(clients):
        groups.setdefault(c, []).append(i)
    cz, cd = cosine_matrix(res.z), cosine_matrix(res.z - res.h)
    ch = cosine_matrix(res.h)
    summary = {"z": summarise("z", cz, groups), "delta": summarise("delta = z - h", cd, groups)}
    summary["h"] = {"blocks": summarise_blocks_only(ch, groups)}
    print(
        "\nh (unedited hidden state) for reference: mean within-client "
        + ", ".join(
            f"{k.split()[-1]} {v['mean']:.3f}" for k, v in summary["h"]["blocks"].items() if k.startswith("within")
        )
        + f"; across pairs {summary['h']['blocks']['pair01 x pair23']['mean']:.3f}"
    )
    return {
        "case_ids": [r.case_id for r in requests],
        "clients": clients,
        "z_layer": editor.hp.z_layer,
        "z_seconds": res.seconds,
        "target_prob": list(res.target_prob),
        "alphas": ALPHAS,
        "z_cosine": cz.tolist(),
        "delta_cosine": cd.tolist(),
        "h_cosine": ch.tolist(),
        "summary": summary,
    }


def summarise_blocks_only(cos: torch.Tensor, groups: dict[str, list[int]]) -> dict:
    out = {f"within {c}": block_stats(cos, groups[c], groups[c]) for c in sorted(groups)}
    out["pair01 x pair23"] = block_stats(
        cos, groups["client-0"] + groups["client-1"], groups["client-2"] + groups["client-3"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from fededit_core.data.loaders import load_requests
    from fededit_core.memit.editor import make_editor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a light load)")
    parser.add_argument("--no-z", action="store_true", help="skip check 2 (the z optimisation)")
    parser.add_argument("--json", default=str(OUT), help="where the cosine matrices go")
    args = parser.parse_args(argv)

    path = Path(args.data)
    requests = load_requests(path)
    clients = read_clients(path)
    print(
        f"{path}: {len(requests)} requests, clients "
        + ", ".join(f"{c}: {clients.count(c)}" for c in sorted(set(clients)))
    )
    editor = make_editor(args.model)
    torch.set_num_threads(max(1, args.threads))  # after make_editor, which sets every core
    ok = check_knowledge(editor.model, editor.tok, requests, clients)
    if not args.no_z:
        result = check_z(editor, requests, clients)
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
