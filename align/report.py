"""The run report: one self-contained HTML page (`runs/NAME/report.html`) showing what each stage did.

It is generic over stages: for every stage directory it shows the manifest's headline figures, a plot
of each logged metric family from `metrics.jsonl`, every PNG the stage wrote (images embedded as data
URIs, so the page reads offline and can be mailed) and every markdown table (`*.md`) it wrote. Stages
therefore grow the report by writing PNGs and tables into their own directory.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from collections import defaultdict
from pathlib import Path

from align.io import read_json, read_metrics, write_text_atomic
from align.rundir import one_line
from align.stats import fmt_share

# Metric keys plotted together (a panel each), by prefix; every other logged key is shown in the table.
PANELS = (
    ("loss", ("train/loss", "rm/loss", "ppo/policy_loss", "ppo/value_loss")),
    ("accuracy", ("rm/accuracy", "train/token_accuracy")),
    ("reward", ("reward/combined_mean", "reward/helpful_mean", "reward/safety_mean", "eval/reward_heldout")),
    ("KL", ("kl/ref_mean", "ppo/approx_kl")),
    ("learning rate", ("train/lr", "rm/lr")),
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem} td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1rem} .figs figure{margin:0} .figs img{max-width:520px;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555} .muted{color:#777} .status-done{color:#1a7f37} .status-missing{color:#b00}
"""


def _img(data: bytes, caption: str) -> str:
    b64 = base64.b64encode(data).decode()
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _plot_panels(rows: list[dict]) -> list[tuple[str, bytes]]:
    """One PNG per panel whose keys were logged, value against step."""
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                series[k].append((r["step"], v))
    out = []
    for title, keys in PANELS:
        present = [k for k in keys if len(series.get(k, ())) >= 2]
        if not present:
            continue
        fig = Figure(figsize=(5.2, 3.0))
        ax = fig.subplots()
        for k in present:
            last = {}
            for step, v in series[k]:
                last[step] = v  # a resumed run re-logs a few steps: keep the latest value of each
            xs = sorted(last)
            ax.plot(xs, [last[x] for x in xs], marker="." if len(xs) < 40 else None, label=k)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        out.append((f"{title} per step", buf.getvalue()))
    return out


def _change(s: dict, key: str, lo: str, hi: str, n: str, what: str, noise: str) -> str:
    text = f"{what} {s[key]:+.3f} [{s[lo]:+.3f}, {s[hi]:+.3f}] (n={s[n]})"
    return text + (" <b>within noise</b>" if s.get(noise) else "")


def _kl(s: dict) -> str:
    """PPO's KL to the reference after its last iteration. The k3 estimate first: the k1 mean (the
    penalty's) is unbiased but goes below 0 on a batch when the policy has barely moved."""
    if "kl/ref_final_k3" not in s:  # a run from before k3 was kept
        return f"; KL to the reference {s['kl/ref_final']:.3f}"
    return f"; KL to the reference {s['kl/ref_final_k3']:.3f} (k3; k1 {s['kl/ref_final']:.3f})"


def headline(kind: str, s: dict) -> str:
    """A stage's headline effect with its n and 95% interval, as HTML ('' when the stage measured none)."""
    try:
        if kind == "sft" and "heldout/loss_change" in s:
            return (
                f"held-out answer loss {s['heldout/loss_before']:.3f} &rarr; {s['heldout/loss_after']:.3f}: "
                + _change(
                    s,
                    "heldout/loss_change",
                    "heldout/loss_change_lo",
                    "heldout/loss_change_hi",
                    "heldout/n",
                    "change",
                    "heldout/within_noise",
                )
            )
        if kind == "reward":
            # eval/<category>/rm/accuracy per held-out category (eval/rm/accuracy is over all of them)
            cats = sorted(
                {p[1] for k in s if len(p := k.split("/")) == 4 and p[0] == "eval" and p[2:] == ["rm", "accuracy"]}
            )
            return "; ".join(
                f"{c}: accuracy {fmt_share(s[f'eval/{c}/rm/accuracy'], s[f'eval/{c}/rm/accuracy/ci_low'], s[f'eval/{c}/rm/accuracy/ci_high'], int(s[f'eval/{c}/rm/n']))}, "
                f"length-balanced {s[f'eval/{c}/rm/length/balanced_accuracy'] * 100:.1f}%"
                for c in cats
            )
        if kind == "rejection" and "rejection/reward_gain_lo" in s:
            return _change(
                s,
                "rejection/reward_gain",
                "rejection/reward_gain_lo",
                "rejection/reward_gain_hi",
                "rejection/heldout_n",
                "held-out reward",
                "rejection/within_noise",
            )
        if kind == "ppo" and "eval/reward_heldout_change" in s:
            return _change(
                s,
                "eval/reward_heldout_change",
                "eval/reward_heldout_change_lo",
                "eval/reward_heldout_change_hi",
                "eval/heldout_n",
                "held-out reward",
                "eval/within_noise",
            ) + _kl(s)
        if kind == "gatt":
            turns = sorted(int(m.group(1)) for k in s if (m := re.fullmatch(r"gatt/recall_after/turn(\d+)_lo", k)))
            return "recall " + ", ".join(
                f"turn {t}: {s[f'gatt/recall_before/turn{t}'] * 100:.0f}% &rarr; {s[f'gatt/recall_after/turn{t}'] * 100:.0f}% "
                f"[{s[f'gatt/recall_after/turn{t}_lo'] * 100:.0f}, {s[f'gatt/recall_after/turn{t}_hi'] * 100:.0f}] "
                f"(n={s[f'gatt/recall_after/turn{t}_n']})"
                for t in turns
            )
        if kind == "label":  # agreement, kappa, gold accuracy and progress of the round
            from align.label.report import label_headline

            return label_headline(s)
        if kind == "eval":
            wins = sorted(
                k
                for k in s
                if k.startswith("eval/") and "/lc_winrate_helpful_vs_" in k and not k.endswith(("_lo", "_hi"))
            )
            return "; ".join(
                f"{k.split('/')[1]}: LC win {s[k] * 100:.0f}% [{s[k + '_lo'] * 100:.0f}, {s[k + '_hi'] * 100:.0f}]"
                f" (raw {s[k.replace('lc_winrate', 'winrate')] * 100:.0f}%)"
                for k in wins
            )
    except KeyError:  # a manifest written before a figure existed: no headline rather than no report
        return ""
    return ""


def _summary_table(summary: dict) -> str:
    rows = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
        if isinstance(v, float)
        else f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
        for k, v in rows
    )
    return f"<details><summary>all {len(rows)} figures</summary><table><tr><th>metric</th><th>value</th></tr>{body}</table></details>"


def _markdown(text: str) -> str:
    import markdown

    out = markdown.markdown(text, extensions=["tables"])
    # A stage's own headings sit under the stage's <h2>.
    for level in (2, 1):
        out = out.replace(f"<h{level}>", f"<h{level + 2}>").replace(f"</h{level}>", f"</h{level + 2}>")
    return out


def stage_section(run_dir: Path, name: str) -> str:
    d = run_dir / name
    m = read_json(d / "manifest.json")
    parts = [
        f'<h2 id="{name}">{html.escape(name)} <span class="muted">({html.escape(m["kind"])}, '
        f"{m['wall_s']:.0f} s, finished {html.escape(m['finished_at'])})</span></h2>"
    ]
    model = m["summary"].get("model_dir")
    if model:
        parts.append(f"<p>checkpoint: <code>{html.escape(str(model))}</code></p>")
    for md in sorted(d.glob("*.md")):
        parts.append(_markdown(md.read_text(encoding="utf-8")))
    figs = _plot_panels(read_metrics(d / "metrics.jsonl"))
    figs += [(png.name, png.read_bytes()) for png in sorted(d.glob("*.png"))]
    if figs:
        parts.append('<div class="figs">' + "".join(_img(data, cap) for cap, data in figs) + "</div>")
    parts.append(_summary_table(m["summary"]))
    return "\n".join(parts)


def build_report(run_dir: str | Path, stages: list[str] | None = None) -> Path:
    """Write `run_dir/report.html`; returns its path. Stages default to those in run.json."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {"config": {}}
    stages = stages or list(run["config"].get("stages", []))
    rows, sections = [], []
    for name in stages:
        mpath = run_dir / name / "manifest.json"
        if not mpath.is_file():
            rows.append(
                f'<tr><td><a href="#{name}">{name}</a></td><td class="status-missing">not finished</td>'
                "<td></td><td></td></tr>"
            )
            continue
        m = read_json(mpath)
        effect = headline(m["kind"], m["summary"]) or html.escape(one_line(m))
        rows.append(
            f'<tr><td><a href="#{name}">{name}</a></td><td class="status-done">done</td>'
            f'<td>{m["wall_s"]:.0f} s</td><td style="text-align:left">{effect}</td></tr>'
        )
        sections.append(stage_section(run_dir, name))
    cfg = run["config"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>align run {html.escape(run_dir.name)}</title>
<style>{CSS}</style></head><body>
<h1>align run <code>{html.escape(run_dir.name)}</code></h1>
<p class="muted">model: {html.escape(json.dumps(cfg.get("model", {})))} · seed {cfg.get("seed", "")} ·
report built {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
<table><tr><th>stage</th><th>status</th><th>wall</th><th>headline effect (n, 95% interval)</th></tr>{"".join(rows)}</table>
{"".join(sections)}
</body></html>"""
    out = run_dir / "report.html"
    write_text_atomic(out, page)
    return out
