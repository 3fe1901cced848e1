"""The man page and the bash completion of ``blockfuse``, made from its argument parser.

    python -m blockfuse.cli.manpage man > blockfuse.1
    python -m blockfuse.cli.manpage bash > blockfuse.bash

Both are read off the parser ``build_parser`` makes (every subcommand, its arguments,
their help), so they say what ``--help`` says and cannot drift from it; ``scripts/setup``
writes them into the venv (``.venv/share/man/man1/blockfuse.1``,
``.venv/share/bash-completion/completions/blockfuse``) whenever the CLI changed.
Options hidden from ``--help`` are left out of both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from .. import __version__

SECTIONS = {
    "FILES": (
        "Status and control of a mount are its flat files' extended attributes, "
        "user.blockfuse.*; a server answers on its control socket. A server registers in "
        "the runtime directory ($BLOCKFUSE_RUNTIME_DIR, else /run/blockfuse for root, else "
        "$XDG_RUNTIME_DIR/blockfuse), where blockfuse status finds it."
    ),
    "ENVIRONMENT": (
        "NOTIFY_SOCKET: tell systemd READY=1 and STOPPING=1 (Type=notify units). "
        "LISTEN_FDS, LISTEN_PID: socket activation of blockfuse serve. "
        "BLOCKFUSE_RUNTIME_DIR: where servers register."
    ),
    "EXIT STATUS": (
        "0 on success; 1 when something failed (a device that cannot open, a flush that "
        "failed at exit, a refused control); 2 for bad usage (a malformed spec or option, "
        "a config file that cannot be used)."
    ),
    "SEE ALSO": "fusermount3(1), losetup(8), nbdkit(1), qemu-nbd(8), systemd.service(5). "
    "The README of blockfuse has the details and examples.",
}


GLOBAL = ("log_level", "verbose", "config")
"""Options every command takes too: described once, under OPTIONS."""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def visible(
    parser: argparse.ArgumentParser, *, everything: bool = False
) -> Iterator[argparse.Action]:
    """The actions ``--help`` shows, but for ``-h`` (and the options every command takes,
    unless ``everything``)."""
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(
            action, argparse._SubParsersAction | argparse._HelpAction
        ):
            continue
        if everything or action.dest not in GLOBAL:
            yield action


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, a leading dot or
    quote kept from being a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def metavar(action: argparse.Action) -> str:
    return str(
        action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    )


def option_words(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{roff(metavar(action))}\\fR"
    names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
    return names if action.nargs == 0 else f"{names} \\fI{roff(metavar(action))}\\fR"


def usage(words: str, parser: argparse.ArgumentParser, *, everything: bool = False) -> str:
    """``blockfuse mount [--device NAME=SPEC] ... [mountpoint]``, in roff."""
    out = [f"\\fB{roff(words)}\\fR"]
    for action in visible(parser, everything=everything):
        if not action.option_strings:
            item = f"\\fI{roff(metavar(action))}\\fR"
            out.append(f"[{item}]" if action.nargs == "?" else item)
            continue
        item = f"\\fB{roff(action.option_strings[0])}\\fR"
        if action.nargs != 0:
            item += f" \\fI{roff(metavar(action))}\\fR"
        out.append(item if action.required else f"[{item}]")
    return " ".join(out)


def man_page(parser: argparse.ArgumentParser) -> str:
    """The man page (section 1) of ``parser`` and its subcommands, in roff."""
    lines = [
        f'.TH BLOCKFUSE 1 "" "blockfuse {__version__}" "User Commands"',
        ".SH NAME",
        "blockfuse \\- " + roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".PP",
        usage("blockfuse", parser, everything=True) + " \\fICOMMAND\\fR ...",
    ]
    commands = subcommands(parser)
    for name, sub in commands.items():
        for inner, inner_parser in subcommands(sub).items() or [("", sub)]:
            lines += [".PP", usage(f"blockfuse {name} {inner}".strip(), inner_parser)]
    lines += [".SH OPTIONS", roff("Accepted before the command and after it (but --version).")]
    lines += describe_actions(parser, everything=True)
    lines.append(".SH COMMANDS")
    for name, sub in commands.items():
        lines += [f".SS {roff(name)}", roff(sub.description or "")]
        lines += describe_actions(sub)
        for inner, inner_parser in subcommands(sub).items():
            lines += [
                ".TP",
                f"\\fB{roff(name)} {roff(inner)}\\fR",
                roff(inner_parser.description or ""),
            ]
            for action in visible(inner_parser):
                if action.help:
                    lines += [".RS", ".TP", option_words(action), roff(action.help), ".RE"]
        if sub.epilog:
            lines += [".PP", roff(sub.epilog)]
    for title, text in SECTIONS.items():
        lines += [f".SH {title}", roff(text)]
    return "\n".join(lines) + "\n"


def describe_actions(parser: argparse.ArgumentParser, *, everything: bool = False) -> list[str]:
    lines = []
    for action in visible(parser, everything=everything):
        help_text = action.help or ""
        if "%(" in help_text:
            help_text %= {"default": action.default, "prog": parser.prog}
        lines += [".TP", option_words(action), roff(help_text)]
    return lines


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for ``blockfuse``: commands, then each command's
    options (and a mirror's actions), the log levels after ``--log-level``; file names
    otherwise."""
    commands = subcommands(parser)
    top = [*commands, *option_names(parser)]
    cases, nested = [], []
    taking = set(taking_value(parser))
    for name, sub in commands.items():
        actions = subcommands(sub)
        taking |= set(taking_value(sub))
        words = list(actions) if actions else option_names(sub)
        cases.append(f"        {name}) opts={quoted(words)}; files={'no' if actions else 'yes'} ;;")
        for inner, inner_parser in actions.items():
            taking |= set(taking_value(inner_parser))
            nested.append(f"        '{name} {inner}') opts={quoted(option_names(inner_parser))} ;;")
    levels = quoted(["error", "warning", "info", "debug"])
    return f"""# bash completion for blockfuse (made from its parser by blockfuse.cli.manpage)
_blockfuse() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local command="" action="" opts={quoted(top)} files=no i skip=""
    local taking={quoted(sorted(taking))}
    if [[ $prev == --log-level ]]; then
        mapfile -t COMPREPLY < <(compgen -W {levels} -- "$cur")
        return
    fi
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ -n $skip ]]; then skip=""; continue; fi
        case " $taking " in *" ${{COMP_WORDS[i]}} "*) skip=1; continue ;; esac
        case ${{COMP_WORDS[i]}} in
            -*) ;;
            *) if [[ -z $command ]]; then command=${{COMP_WORDS[i]}}
               elif [[ -z $action ]]; then action=${{COMP_WORDS[i]}}; fi ;;
        esac
    done
    case $command in
{chr(10).join(cases)}
    esac
    case "$command $action" in
{chr(10).join(nested)}
    esac
    if [[ -n $action ]]; then files=yes; fi
    if [[ $cur == -* || $files == no ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    fi
}}
complete -o filenames -F _blockfuse blockfuse
"""


def taking_value(parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``parser`` followed by a value."""
    return [o for a in visible(parser, everything=True) if a.nargs != 0 for o in a.option_strings]


def quoted(words: list[str]) -> str:
    return '"' + " ".join(words) + '"'


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in visible(parser, everything=True) for o in a.option_strings]


def main(argv: list[str] | None = None) -> int:
    from . import build_parser

    what = (argv if argv is not None else sys.argv[1:]) or ["man"]
    parser, _ = build_parser()
    if what[0] == "man":
        sys.stdout.write(man_page(parser))
    elif what[0] == "bash":
        sys.stdout.write(bash_completion(parser))
    else:
        print("usage: python -m blockfuse.cli.manpage man|bash", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
