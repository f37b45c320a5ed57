#!/usr/bin/env python3
"""Renders the results of tools/quality.sh (JSON lines from pyramid-eval, each with a "label"
and "command" added) as the markdown table of docs/quality.md, replacing what lies between
the lines <!-- quality-table:begin --> and <!-- quality-table:end -->.

Usage: quality_table.py RESULTS.jsonl DOCS/quality.md   (prints the table when DOC is "-")
"""
import json
import sys

BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
# The bar of issue 3 at retention 0.5: passkey >= 80 % of full's at each length, ppl within 6 %.
PASSKEY_SHARE, PPL_SLACK = 0.8, 1.06


POLICY_ORDER = ["full", "pyramid", "streaming", "h2o", "snapkv", "pyramidkv", "snapshrink"]


def row_key(item):
    """full first, then rows without a target (pyramid's own knobs), then by target from the
    largest down, the policies in a fixed order, and shrinking on before off."""
    label, r = item
    kv = (r.get("perplexity") or r.get("passkey"))["kv"]
    policy = kv["policy"]
    rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)
    target = kv.get("retention") or 0
    return (policy != "full", target != 0, -target, rank, -kv.get("prefill_shrink", 0), label)


def load(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            rows.setdefault(r["label"], {})[r["mode"]] = r
    return rows


def fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def describe(ppl, pk):
    """Prefill shrinking and the solved knobs of one configuration (at P = 1024)."""
    kv = (ppl or pk)["kv"]
    shrink = {0: "off", 1: "on"}.get(kv.get("prefill_shrink"), "–")
    knobs = "–"
    if kv["policy"] == "pyramid":
        knobs = f"rho {kv['rho']:.3g}, gamma {kv['gamma']:.3g}, W {kv.get('window', '–')}"
    elif "budget" in kv:
        knobs = f"budget {kv['budget']}"
        if kv.get("prefill_shrink") and kv.get("shrink_start"):
            knobs += f", shrinks from layer {kv['shrink_start']}"
    return shrink, knobs


def bar(ppl, pk, full_ppl, full_pk):
    """Does this configuration meet the issue's bar against full? ("yes"/"no"/"–")."""
    if not (ppl and pk and full_ppl and full_pk):
        return "–"
    ok = ppl["ppl"] <= PPL_SLACK * full_ppl["ppl"]
    for length, acc in full_pk["accuracy"].items():
        ok = ok and pk["accuracy"].get(length, 0.0) >= PASSKEY_SHARE * acc
    return "yes" if ok else "no"


def table(rows):
    full = rows.get("full", {})
    full_ppl, full_pk = full.get("perplexity"), full.get("passkey")
    lengths = list((full_pk or next((r["passkey"] for r in rows.values() if "passkey" in r), {}))
                   .get("accuracy", {}).keys())
    head = ["configuration", "prefill shrink", "knobs at P = 1024", "retention (ppl)", "ppl",
            "ppl vs full"]
    head += [f"passkey {length}" for length in lengths]
    head += ["retention (passkey)", "meets the bar"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in sorted(rows.items(), key=row_key):
        ppl, pk = r.get("perplexity"), r.get("passkey")
        shrink, knobs = describe(ppl, pk)
        rel = f"{100 * (ppl['ppl'] / full_ppl['ppl'] - 1):+.1f} %" if ppl and full_ppl else "–"
        cells = [label, shrink, knobs, fmt(ppl and ppl["mean_retention"], 3),
                 fmt(ppl and ppl["ppl"], 3), rel]
        cells += [fmt(pk and pk["accuracy"].get(length)) for length in lengths]
        cells += [fmt(pk and pk["mean_retention"], 3),
                  "(reference)" if label == "full" else bar(ppl, pk, full_ppl, full_pk)]
        out.append("| " + " | ".join(cells) + " |")
    any_r = next(iter(rows.values()))
    p, k = any_r.get("perplexity"), any_r.get("passkey")
    notes = []
    if p:
        notes.append(f"perplexity: {p['windows']} windows, P = {p['prompt_len']}, "
                     f"T = {p['eval_len']}, seed {p['seed']}")
    if k:
        sizes = ", ".join(f"{v:.0f}" for v in k["mean_prompt_tokens"].values())
        notes.append(f"passkey: {k['samples']} prompts per length, seed {k['seed']}, "
                     f"mean prompt lengths {sizes} tokens")
    return "\n".join(out) + "\n\n" + "; ".join(notes) + ".\n"


def main():
    rows = load(sys.argv[1])
    text = table(rows)
    if sys.argv[2] == "-":
        sys.stdout.write(text)
        return
    doc = open(sys.argv[2], encoding="utf-8").read()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(doc[:start] + "\n" + text + doc[end:])


if __name__ == "__main__":
    main()
