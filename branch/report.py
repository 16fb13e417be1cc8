"""The light-cone report: one self-contained HTML page and a PNG, from the record alone.

The figure shows the run's loss as it went (the realized path), every explored
future fanning out from its origin (the chosen one bold, the control dashed,
the others thin), the abandoned stretch that led into the trouble (grey), and
a marker where each trigger fired. The page adds, per event, why the trigger
fired, where it rolled back to, and a table of futures: intervention, held-out
loss, difference to the control with its confidence interval, and the
decision. The PNG is embedded in the page, so the HTML file stands alone.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

import qckpt  # noqa: E402
from branch.record import ConeRecord  # noqa: E402


def _finite(points: list[list[Any]]) -> tuple[list[float], list[float]]:
    kept = [(p[0], p[1]) for p in points if p[1] is not None and math.isfinite(p[1])]
    return [k[0] for k in kept], [k[1] for k in kept]


def figure_png(record: ConeRecord, *, width: float = 11.0, height: float = 6.5) -> bytes:
    """The light-cone figure as PNG bytes."""
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    try:
        for event in record.events:
            origin = event["origin"]
            xs, ys = _finite(event["abandoned"])
            if xs:
                ax.plot(xs, ys, color="tab:red", linewidth=1.0, linestyle=":", alpha=0.8,
                        label="abandoned (led into the trigger)" if event["number"] == 1 else None)  # fmt: skip
            for future in event["futures"]:
                chosen = future["name"] == event["selection"]["chosen"]
                xs, ys = _finite([[origin["step"], None]] + future["metrics"])
                style = {"linewidth": 2.4 if chosen else 1.0, "alpha": 1.0 if chosen else 0.75,
                         "linestyle": "--" if future["control"] else "-", "zorder": 7 if chosen else 6}  # fmt: skip
                note = " (chosen)" if chosen else (" (cut at the rung)" if future.get("pruned_at") is not None else "")
                ax.plot(xs, ys, **style, label=f"e{event['number']} {future['label']}{note}")
            trigger = event["trigger"]
            ax.axvline(trigger["step"], color="tab:red", linewidth=0.8, alpha=0.7)
            ax.annotate(f"trigger {event['number']}", (trigger["step"], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8, color="tab:red")  # fmt: skip
            ax.axvline(origin["step"], color="tab:blue", linewidth=0.8, linestyle=":", alpha=0.7)
        xs, ys = _finite(record.main)
        ax.plot(xs, ys, color="black", linewidth=0.8, alpha=0.3, zorder=5)
        smooth = [sum(ys[max(0, i - 4) : i + 5]) / len(ys[max(0, i - 4) : i + 5]) for i in range(len(ys))]
        ax.plot(xs, smooth, color="black", linewidth=1.6, label="run (realized path; raw faint, 9-step mean bold)", zorder=5)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"light cone of run {record.run!r}: {len(record.events)} event{'s' if len(record.events) != 1 else ''}")
        if ys:  # keep the view on the run; a diverging future should not flatten everything else
            ordered = sorted(ys)
            lo, hi = ordered[0], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.35 * (hi - lo + 1e-9))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
        ax.grid(alpha=0.3)
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    return html.escape(str(x))


def _trigger_text(trigger: dict[str, Any]) -> str:
    fired = [s for s in trigger["signals"] if s["score"] >= 1.0] or sorted(trigger["signals"], key=lambda s: -s["score"])[:1]
    parts = []
    for s in fired:
        d = s["details"]
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in d.items() if not isinstance(v, (dict, list)))
        parts.append(f"<b>{html.escape(s['detector'])}</b> (score {_fmt(s['score'], 3)}: {shown})")
    return "; ".join(parts)


def page_html(record: ConeRecord, png: bytes) -> str:
    """The self-contained report page (the figure embedded)."""
    rows = []
    for event in record.events:
        comparisons = {c["name"]: c for c in event["selection"]["comparisons"]}
        chosen = event["selection"]["chosen"]
        rows.append(
            f"<h2>Event {event['number']}: trigger at step {event['trigger']['step']}</h2>"
            f"<p>Anomaly began at step {event['trigger']['began']}; {_trigger_text(event['trigger'])}. "
            f"Rolled back to step {event['origin']['step']} (snapshot <code>{event['origin']['snapshot'][:12]}</code>), "
            f"horizon {event['horizon']} steps, skip {event['skip']} batches. "
            f"Continued along <b>{html.escape(chosen)}</b> (join <code>{event['join'][:12]}</code>)."
            + (f" Futures ran {html.escape(event['rollouts']['strategy'])}: {html.escape(event['rollouts']['why'])}."
               if "rollouts" in event else "") + "</p>"
            "<table><tr><th>future</th><th>intervention</th><th>held-out loss</th><th>vs control</th>"
            "<th>interval</th><th>branch</th><th>decision</th></tr>"
        )
        for future in event["futures"]:
            c = comparisons.get(future["name"])
            interval = f"[{_fmt(c['low'])}, {_fmt(c['high'])}] ({100 * c['level']:.3g}%)" if c else "-"
            verdict = "chosen" if future["name"] == chosen else ("better beyond noise" if c and c["qualifies"] else "")
            verdict += " (diverged)" if future["diverged"] else ""
            if future.get("pruned_at") is not None:
                forecast = future.get("rung_forecast", {}).get("value")
                observed = f"loss {_fmt(future['rung_observed'])} at the rung, " if "rung_observed" in future else ""
                verdict = f"cut at step {future['pruned_at']} ({observed}forecast {_fmt(forecast)})"
            rows.append(
                f"<tr class='{'chosen' if future['name'] == chosen else ''}'><td>{html.escape(future['name'])}</td>"
                f"<td>{html.escape(future['label'])}</td><td>{_fmt(future['eval_mean'])}</td>"
                f"<td>{_fmt(c['mean']) if c else ('control' if future['control'] else '-')}</td><td>{interval}</td>"
                f"<td><code>{html.escape(future['branch'])}</code></td><td>{verdict}</td></tr>"
            )
        rows.append("</table>")
    image = base64.b64encode(png).decode()
    compute = record.compute
    main_steps = record.main[-1][0] if record.main else 0
    events = f"{len(record.events)} event{'s' if len(record.events) != 1 else ''}"
    summary = (f"{events}; {compute['train_steps']} training steps in all (the run's path "
               f"has {main_steps}), {compute['eval_batches']} held-out evaluation batches.")  # fmt: skip
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>light cone: {html.escape(record.run)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
tr.chosen {{ background: #e6f4ea; font-weight: 600; }}
code {{ font-size: 0.9em; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>Light cone of run <code>{html.escape(record.run)}</code> on branch <code>{html.escape(record.branch)}</code></h1>
<p>{summary}</p>
<img alt="loss curve with explored futures" src="data:image/png;base64,{image}">
{"".join(rows) or "<p>No trigger fired: the run went as it was.</p>"}
</body></html>
"""


def write_report(repo: qckpt.Repository, run: str, dest: str | Path) -> tuple[Path, Path]:
    """Write ``<dest>.html`` and ``<dest>.png`` (``dest`` without suffix, or ending in
    .html) for ``run``'s record in ``repo``; returns both paths."""
    if "://" in str(dest):  # Path would turn s3://b/r into a local directory named 's3:'
        raise qckpt.InvalidInputError(f"the report is written to a local path, not {str(dest)!r}")
    base = Path(dest)
    base = base.with_suffix("") if base.suffix in (".html", ".png") else base
    record = ConeRecord.load(repo, run)
    html_path, png_path = base.with_name(base.name + ".html"), base.with_name(base.name + ".png")
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise qckpt.InvalidInputError(f"cannot write the report to {html_path}: {e.filename or html_path.parent} is not a directory") from e
    png = figure_png(record)
    png_path.write_bytes(png)
    html_path.write_text(page_html(record, png))
    return html_path, png_path
