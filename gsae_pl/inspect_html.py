"""The page and the TensorBoard texts of `python -m gsae_pl.inspect` (gsae_pl/inspect.py).

The page is one static HTML file: inline CSS, no script, no link, no image, nothing fetched,
so it opens from disk anywhere (a laptop, a cluster's file browser) and shows the same.
Every piece of text that came from outside (tokens, the run's name, paths) is HTML-escaped;
control characters show as their Unicode pictures (a newline as a return arrow), so a
token's whitespace is visible. TensorBoard's text plugin renders Markdown (and drops raw
HTML), so the texts say the same in Markdown, with the activating token in bold.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Context:
    """One of a latent's top activations: its value, and where it was."""

    activation: float
    where: str  # "held-out row 812", or "window 3, token 17" on an LM source
    tokens: list[str] | None = None  # the decoded tokens around it (LM sources)
    focus: int = 0  # which of `tokens` activated the latent


@dataclass
class Latent:
    index: int
    density: float  # fraction of the held-out rows it fired on
    fired: int  # how many of them
    contexts: list[Context]
    promoted: list[tuple[str, float]] | None = None  # (token, logit contribution)


@dataclass
class Inspection:
    """What the page shows: the run, how it was looked at, and the latents."""

    run: str
    step: int  # the checkpoint's optimiser step
    facts: list[tuple[str, str]]  # (what, value) about the run, in order
    rows: int  # held-out rows read
    chosen: str  # how the latents were chosen, in words
    latents: list[Latent]
    promoted_note: str  # what the promoted tokens are, or why there are none
    notes: list[str] = field(default_factory=list)


def visible(text: str) -> str:
    """Text with control characters as visible symbols: a newline as U+21B5, the others
    as their Unicode control pictures (U+2400 + code)."""
    return "".join("\u21b5" if c == "\n" else chr(0x2400 + ord(c)) if ord(c) < 32
                   else "\u2421" if c == "\x7f" else c for c in text)


def _esc(text) -> str:
    return html.escape(visible(str(text)), quote=True)


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%"


# ---- HTML --------------------------------------------------------------------------------
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin: 1.6em 0 .3em; }
h3 { font-size: .95em; margin: .9em 0 .3em; color: #444; }
table { border-collapse: collapse; margin: .3em 0; }
th, td { border-bottom: 1px solid #e2e2e2; padding: .2em .6em; text-align: left;
         vertical-align: top; }
th { background: #f4f4f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; }
.ctx { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap;
       word-break: break-all; }
.tok { white-space: pre; }
mark.tok { background: #ffb347; color: #000; border-radius: 3px; padding: 0 1px;
           outline: 1px solid #e07b00; font-weight: 600; }
.promoted .tok { font-family: ui-monospace, monospace; background: #eef3ff;
                 border-radius: 3px; padding: 0 2px; }
.note { color: #555; }
section { border-top: 2px solid #ddd; }
"""


def page(view: Inspection) -> str:
    """The whole HTML page."""
    facts = "".join(f"<dt>{_esc(what)}</dt><dd>{_esc(value)}</dd>" for what, value in view.facts)
    notes = "".join(f'<p class="note">{_esc(note)}</p>' for note in view.notes)
    body = [f"<h1>Latents of <code>{_esc(view.run)}</code></h1>",
            f'<dl class="facts">{facts}</dl>',
            f"<p>{_esc(view.chosen)}; each with its top held-out activations, the "
            f"activating token highlighted.</p>", notes,
            _overview(view), *(_section(latent, view) for latent in view.latents)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>latents of {_esc(view.run)}</title>\n<style>{CSS}</style>\n</head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _overview(view: Inspection) -> str:
    rows = "".join(
        f'<tr><td><a href="#latent-{lat.index}">{lat.index}</a></td>'
        f'<td class="num">{_percent(lat.density)}</td>'
        f'<td class="num">{_top_activation(lat)}</td>'
        f"<td>{_first_token(lat)}</td></tr>" for lat in view.latents)
    return ("<table><tr><th>latent</th><th>density</th><th>top activation</th>"
            f"<th>top promoted token</th></tr>{rows}</table>")


def _top_activation(latent: Latent) -> str:
    return f"{latent.contexts[0].activation:.4g}" if latent.contexts else "-"


def _first_token(latent: Latent) -> str:
    if not latent.promoted:
        return "-"
    return f'<span class="tok">{_esc(latent.promoted[0][0])}</span>'


def _section(latent: Latent, view: Inspection) -> str:
    head = (f'<section id="latent-{latent.index}"><h2>latent {latent.index}</h2>'
            f"<p>{_esc(_density_line(latent, view.rows))}</p>")
    if latent.contexts:
        text = latent.contexts[0].tokens is not None  # LM source: the context column
        rows = "".join(
            f'<tr><td class="num">{rank}</td><td class="num">{c.activation:.4g}</td>'
            + (f'<td class="ctx">{_context_html(c)}</td>' if text else "")
            + f"<td>{_esc(c.where)}</td></tr>" for rank, c in enumerate(latent.contexts, 1))
        context = "<th>context</th>" if text else ""
        contexts = (f"<h3>top {len(latent.contexts)} held-out activations</h3><table>"
                    f"<tr><th>#</th><th>activation</th>{context}<th>where</th></tr>"
                    f"{rows}</table>")
    else:
        contexts = '<p class="note">it fired on none of the held-out rows</p>'
    return head + contexts + _promoted_html(latent, view) + "</section>"


def _density_line(latent: Latent, rows: int) -> str:
    return (f"fires on {_percent(latent.density)} of the held-out rows ({latent.fired:,} "
            f"of {rows:,})")


def _context_html(context: Context) -> str:
    return "".join(
        f'<mark class="tok">{_esc(tok)}</mark>' if i == context.focus
        else f'<span class="tok">{_esc(tok)}</span>' for i, tok in enumerate(context.tokens))


def _promoted_html(latent: Latent, view: Inspection) -> str:
    if latent.promoted is None:
        return ""
    rows = "".join(f'<tr><td><span class="tok">{_esc(tok)}</span></td>'
                   f'<td class="num">{logit:+.4g}</td></tr>' for tok, logit in latent.promoted)
    return (f'<h3>promoted tokens</h3><p class="note">{_esc(view.promoted_note)}</p>'
            f'<table class="promoted"><tr><th>token</th><th>logit</th></tr>{rows}</table>')


# ---- TensorBoard (Markdown) ----------------------------------------------------------------
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md(text) -> str:
    """Text that Markdown shows as it is: HTML-escaped, its punctuation backslashed."""
    return _MARKDOWN.sub(r"\\\1", html.escape(visible(str(text)), quote=False))


def _md_focus(token: str) -> str:
    """The activating token in bold (its outer spaces outside the markers, where
    Markdown wants them; a blank token as an open-box space)."""
    core = token.strip(" ")
    if not core:
        return "**\u2423**"
    lead, trail = token[:len(token) - len(token.lstrip(" "))], token[len(token.rstrip(" ")):]
    return f"{md(lead)}**{md(core)}**{md(trail)}"


def markdown(latent: Latent, view: Inspection) -> str:
    """One latent's TensorBoard text."""
    lines = [f"**latent {latent.index}** of {md(view.run)}: "
             f"{md(_density_line(latent, view.rows))}", ""]
    if latent.contexts:
        if latent.contexts[0].tokens is None:  # not an LM source: no context column
            lines += ["| # | activation | where |", "|---|---|---|"]
            lines += [f"| {rank} | {c.activation:.4g} | {md(c.where)} |"
                      for rank, c in enumerate(latent.contexts, 1)]
        else:
            lines += ["| # | activation | context | where |", "|---|---|---|---|"]
            lines += [f"| {rank} | {c.activation:.4g} | {_md_context(c)} | {md(c.where)} |"
                      for rank, c in enumerate(latent.contexts, 1)]
    else:
        lines.append("it fired on none of the held-out rows")
    if latent.promoted is not None:
        tokens = ", ".join(f"\u201c{md(tok)}\u201d {logit:+.4g}" for tok, logit in latent.promoted)
        lines += ["", f"promoted tokens ({md(view.promoted_note)}): {tokens}"]
    return "\n".join(lines) + "\n"


def _md_context(context: Context) -> str:
    return "".join(_md_focus(t) if i == context.focus else md(t)
                   for i, t in enumerate(context.tokens))


def about_markdown(view: Inspection) -> str:
    """The TensorBoard text that says what the latents' texts are."""
    facts = "\n".join(f"- {md(what)}: {md(value)}" for what, value in view.facts)
    notes = "".join(f"\n\n{md(note)}" for note in view.notes)
    return (f"**{md(view.chosen)}** (python -m gsae\\_pl\\.inspect; the page: "
            f"inspect/latents\\.html in the run folder)\n\n{facts}{notes}\n")
