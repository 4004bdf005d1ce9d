"""Options are dataclass fields; each field's metadata says how the CLI spells it.

    uncurl options --markdown      # the README's option tables, generated from these fields

An option is written once, as a field of an options dataclass (``pipeline.PruneOptions``,
``sweep.SweepOptions``, ...): its Python name, type and default are the field's, and
:func:`opt` adds what the command line needs (flags, help, ``--help`` panel, bounds). The Typer
commands in ``cli.py`` are built from these fields (:func:`parameters`), and so are the README's
tables (:func:`markdown`), so the Python API, the CLI and the README cannot disagree on a default.

Two small mechanisms cover what differs between commands:

- ``parse``: the CLI reads one text and the field holds a value, e.g. sweep's ``--keep 6,4,2`` is
  ``keeps=(6, 4, 2)``; the CLI's default is the field's default spelled back (``"6,4,2"``).
- per-command changes, by command name: ``opt(..., eval=dict(flags=("--max-length",)))`` makes
  ``uncurl eval`` spell ``eval_max_length`` as ``--max-length`` (with its own help and panel).

This module imports nothing heavy, so the step modules may import it (for the defaults).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import UncurlError

# --help panels, in the order they appear
MODEL, DATA, PRUNE, EVAL, RUN = "Model", "Task data", "Pruning", "Evaluation and gate", "Run"

# The defaults, chosen by the methods studies on both test beds (README, "Which method wins";
# benchmarks/results/methods_study*): the evidence, as --help states it, is STUDY_EVIDENCE.
# --merge auto (the default): "fit" where the fit applies, else "aligned" (pipeline.merge_used says which, and why)
AUTO_MERGE = "auto"
DEFAULT_METHOD, DEFAULT_MERGE, DEFAULT_ROUTER = "ean", AUTO_MERGE, "refit"
FIT_EVIDENCE = ("Chosen by the fit study on RTE (README, 'Does it beat pruning?'): task loss gained against EAN "
                "alone, paired over 277 examples, fit minus select: trained test bed -0.013 +- 0.002 nats at K=6, "
                "-0.154 +- 0.006 at K=4, -0.891 +- 0.020 at K=2 of 8; pretrained test bed -0.287 +- 0.012 at K=2, "
                "-0.006 +- 0.004 at K=4 (within noise), and +0.011 +- 0.002 at K=6, where it loses: there EAN alone "
                "scores below the unpruned model and the fit restores the original layers' output. It costs one more "
                "sweep of each MoE block's calibration inputs in its layer's visit (the normal equations; one more "
                "for the step size when it solves per expert): 2.1x the time of select (2.1-2.8x over 3 rounds, "
                "make bench, part fit, 470 MB Mixtral, idle machine; 3.7x before 8 Dec 2026) and a peak of 1.38x "
                "the weights against 1.25x; aligned is the cheap choice")
STUDY_EVIDENCE = ("Defaults from the methods studies (README, 'Which method wins'): no method won everywhere; EAN "
                  "was in the top three on every measure. Task loss gained, mean over tasks and K=6,4,2: "
                  "pretrained test bed EAN 0.096 nats (EAN-mean 0.144, REAP 0.165, frequency 0.409); trained test "
                  "bed EAN 0.51 (REAP 0.42, EAN-mean 0.63, frequency 0.73, uncurl+aligned+refit 1.12, "
                  "uncurl+average 1.55). Accuracy on the pretrained bed: EAN lost 0.8 points, EAN-mean 0.4, "
                  "REAP 1.1, frequency 2.0, uncurl+average 7.2, the top five within about one standard error. By "
                  "generation fidelity (README, 'The study on generation'; pretrained bed, free-form ARC-Easy answers, "
                  "K=4 of 8, 40 prompts), expected acceptance against the parent: EAN with the default --merge (fit) "
                  "0.779 +- 0.020, EAN alone 0.605 (paired -0.173 +- 0.038), REAP 0.705, AIMER 0.500, frequency 0.476.")


@dataclass(frozen=True)
class Flag:
    """How the command line spells one field (the field's metadata["cli"])."""

    flags: tuple[str, ...]  # e.g. ("--keep", "-k"); () lets Typer derive --name (and --no-name for a bool)
    help: str
    panel: Optional[str] = None  # --help section (rich_help_panel); None: "Options"
    min: Optional[int] = None
    envvar: Optional[str] = None
    parse: Optional[Callable[[str, str], Any]] = None  # (text, flag) -> the field's value
    note: str = ""  # README only: what the table adds to the help (Markdown)
    readme_default: Optional[str] = None  # README only: the default as the table shows it
    per_command: dict = field(default_factory=dict)  # command -> changes to the above

    def for_command(self, command: str) -> "Flag":
        return dataclasses.replace(self, **self.per_command.get(command, {}))


def opt(default, *flags: str, help: str, panel: str | None = None, min: int | None = None,
        envvar: str | None = None, parse=None, note: str = "", readme_default: str | None = None, **per_command):
    """A dataclass field that is also a command-line option; ``per_command`` maps a command name
    to what it spells differently (``flags``, ``help``, ``panel``, ...)."""
    known = {f.name for f in dataclasses.fields(Flag)} - {"per_command"}
    for command, changes in per_command.items():  # catch a misspelt keyword (it would name a command)
        if not isinstance(changes, dict) or not set(changes) <= known:
            raise TypeError(f"opt(..., {command}=...) must be a dict of changes to {sorted(known)}")
    spec = Flag(tuple(flags), help, panel, min, envvar, parse, note, readme_default, per_command)
    return field(default=default, metadata={"cli": spec})


def ints(text: str, flag: str) -> tuple[int, ...]:
    """``--keep 6,4,2`` -> (6, 4, 2)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UncurlError(f"{flag} {text!r} must be comma-separated integers, e.g. 6,4,2") from None


def names(text: str, flag: str) -> tuple[str, ...]:
    """``--method ean,frequency`` -> ("ean", "frequency") (empty items dropped)."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def items(text: str, flag: str) -> tuple[str, ...]:
    """``--choices 'yes, no'`` -> ("yes", "no") (each item kept, stripped)."""
    return tuple(c.strip() for c in text.split(","))


def choices_help(registry: dict, extra=lambda spec: "") -> str:
    """The help text of a registry-backed option: every name with its one-line description."""
    return " ".join(f"[bold]{name}[/]: {spec.help}{extra(spec)}." for name, spec in registry.items())


# ---- the fields a command takes ------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One option of one command: the field it sets and how this command spells it."""

    name: str
    type: Any  # what the CLI reads (str for a parsed field)
    default: Any  # as the CLI spells it
    flag: Flag

    def typer_option(self):
        import typer

        f = self.flag
        return typer.Option(*f.flags, help=f.help, rich_help_panel=f.panel, min=f.min, envvar=f.envvar)

    def value(self, given):
        """The field's value from what the CLI read."""
        if self.flag.parse is None or not given:
            return given
        return self.flag.parse(given, self.flag.flags[0] if self.flag.flags else "--" + self.name.replace("_", "-"))


def _spelled(value):
    """A parsed field's default as the command line writes it: (6, 4, 2) -> "6,4,2"."""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else value


def options(cls: type, command: str, wanted: list[str]) -> list[Option]:
    """The fields ``wanted`` of ``cls`` as ``command``'s options, in that order."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = []
    for name in wanted:
        if name not in fields or "cli" not in fields[name].metadata:
            raise KeyError(f"{cls.__name__} has no command-line field {name!r}")
        f = fields[name]
        flag = f.metadata["cli"].for_command(command)
        kind = hints[name]
        if flag.parse is not None:
            kind = str
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if f.default is None:
            kind = Optional[kind]
        out.append(Option(name, kind, _spelled(f.default), flag))
    return out


def parameters(opts: list[Option]) -> list[inspect.Parameter]:
    """The keyword parameters a Typer command reads its options from (Typer reads ``__signature__``)."""
    return [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                              annotation=typing.Annotated[o.type, o.typer_option()]) for o in opts]


# ---- the README's tables -------------------------------------------------------------------------

def _markdown_text(text: str) -> str:
    """Help text (rich markup) as Markdown: [bold]x[/] -> `x`, flags in backticks, | and < escaped."""
    text = re.sub(r"\[bold\](.*?)\[/\]", r"`\1`", text).replace("\\[", "[")
    text = re.sub(r"(?<![`\w-])(--[a-z][a-z0-9-]*)", r"`\1`", text)
    return text.replace("|", "\\|").replace("<", "&lt;")  # builtin:<family> is not an HTML tag


def flag_cell(o: Option) -> str:
    if o.type is bool and not o.flag.flags:  # Typer's --name/--no-name
        return f"`{long_flags(o)[0]}`/`--no-{long_flags(o)[0][2:]}`"
    return ", ".join(f"`{f}`" for f in o.flag.flags or long_flags(o))


def default_cell(o: Option) -> str:
    if o.flag.readme_default is not None:
        return o.flag.readme_default
    d = o.default
    if d is None:
        return ""
    if isinstance(d, bool):
        return f"`{flag_cell(o).split('`')[1]}`" if d else "off"
    return str(d) if isinstance(d, (int, float)) else f"`{d}`"


def markdown(opts: list[Option]) -> str:
    """``opts`` as one Markdown table, a bold row per --help panel, panels in first-seen order."""
    panels = list(dict.fromkeys(o.flag.panel or "Options" for o in opts))
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for panel in panels:
        if len(panels) > 1:
            lines.append(f"| **{panel}** | | |")
        for o in opts:
            if (o.flag.panel or "Options") == panel:
                meaning = _markdown_text(o.flag.help) + (f" {o.flag.note}" if o.flag.note else "")
                lines.append(f"| {flag_cell(o)} | {default_cell(o)} | {meaning} |")
    return "\n".join(lines)


def markdown_besides(opts: list[Option], base: list[Option], base_name: str) -> str:
    """``opts`` as a sentence naming those spelled as in ``base`` (another command's), then a table of the rest."""
    same = {o.name for o in opts if o in base}
    shared = ", ".join("/".join(f"`{f}`" for f in long_flags(o)) for o in opts if o.name in same)
    own = [o for o in opts if o.name not in same]
    if not own:
        return f"Options as in `{base_name}`: {shared}."
    return f"Options as in `{base_name}`: {shared}. Its own options:\n\n" + markdown(own)


def long_flags(o: Option) -> list[str]:
    return [f for f in o.flag.flags if f.startswith("--")] or ["--" + o.name.replace("_", "-")]
