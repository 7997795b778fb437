import json, glob, sys
base = sys.argv[1]
def load(v):
    d = json.load(open(glob.glob(f"{base}/{v}/*.json")[0]))
    m = {}
    for r in d["records"]:
        if "median_ms" in r:
            m[(r["impl"][:6], r["pass"], r["causal"], r["T"])] = r["median_ms"]
    return m, d["meta"].get("commit")
runs = {v: load(v) for v in ("before_1", "after_1", "before_2", "after_2")}
print({v: c for v, (m, c) in runs.items()})
print("| pass, causal, T | before | after | before / after | SDPA / ours before | after |")
print("|---|---|---|---|---|---|")
for ps in ("fwd", "fwd+bwd"):
    for c in (False, True):
        for T in (4096, 8192, 16384):
            k = ("hw2jax", ps, c, T); t = ("torch ", ps, c, T)
            b = [runs[v][0][k] for v in ("before_1", "before_2")]
            a = [runs[v][0][k] for v in ("after_1", "after_2")]
            rb = [runs[v][0][t] / runs[v][0][k] for v in ("before_1", "before_2")]
            ra = [runs[v][0][t] / runs[v][0][k] for v in ("after_1", "after_2")]
            fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
            rng = lambda xs: f"{min(xs):.2f}–{max(xs):.2f}×" if round(min(xs),2)!=round(max(xs),2) else f"{min(xs):.2f}×"
            print(f"| {ps}, {'causal' if c else 'non-causal'}, {T:,} | {fmt(b)} | {fmt(a)} | {sum(b)/sum(a):.2f}× | {rng(rb)} | {rng(ra)} |")
