#!/usr/bin/python3
"""Generate fleeced(8) and fleeced-COMMAND(8) from the argparse tree.

Run at package build time (debian/rules) with the freshly installed module
on PYTHONPATH:  python3 debian/manpages.py OUTDIR

The pages are rendered by argparse-manpage (Debian's python3-argparse-manpage)
from ``fleeced.cli.build_parser()``, so an option added to the command line
is in the manual of the next build.  fleeced(8) documents the whole tree;
fleeced-COMMAND(8) one command and its actions, as git does.  What this
script adds is what argparse does not hold: the manual section (8, system
administration; the generator writes 1), the date and version in the
header, and the FILES and SEE ALSO sections.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from build_manpages.manpage import Manpage  # type: ignore[import-not-found]

from fleeced import __version__
from fleeced.cli import build_parser

SECTION = "8"

FILES = (
    "/etc/fleeced/fleeced.toml\n"
    "the service's configuration (fleeced serve --config); every key is described "
    "in /usr/share/doc/fleeced/examples/fleeced.toml.example\n"
    "/lib/systemd/system/fleeced.service, /lib/systemd/system/fleeced.socket\n"
    "the systemd units; site changes belong in a drop-in (systemctl edit fleeced)\n"
    "/run/fleeced/control.sock, /run/fleeced/nbd.sock\n"
    "the service's control socket and its socket-activated NBD listener\n"
    "/var/lib/fleeced, /var/cache/fleeced\n"
    "disks added at run time and VM attachments; copy-before-write temp stores\n"
    "/usr/share/doc/fleeced/README.md\n"
    "the full documentation"
)


def _date() -> str:
    # The changelog's date (dpkg-buildpackage exports it), so that two builds
    # of one version produce the same pages.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%d")


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def _unwrapped(parser: argparse.ArgumentParser) -> None:
    # argparse wraps help to the terminal's width; man fills paragraphs
    # itself, so the text goes through as written (one line per help).
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for _, _, sub in _commands(parser):
        _unwrapped(sub)


def _render(parser: argparse.ArgumentParser, page: str, summary: str,
            sections: list[tuple[str, str]]) -> str:
    parser.man_short_description = summary  # type: ignore[attr-defined]
    parser._manpage = [{"heading": h, "content": c}  # type: ignore[attr-defined]
                       for h, c in sections]
    man = Manpage(parser)
    man.prog = page
    text = str(man)
    header, _, body = text.partition("\n")
    if not header.startswith(".TH "):
        raise SystemExit(f"{page}: unexpected first line from argparse-manpage: {header!r}")
    date = _date()
    return (f'.TH "{page.upper()}" "{SECTION}" "{date}" "fleeced {__version__}" '
            f'"System Administration"\n{body}')


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # Usage lines too: one line each, filled by man.
    os.environ["COLUMNS"] = "1000"
    parser = build_parser()
    _unwrapped(parser)
    commands = _commands(parser)
    pages = [f"fleeced-{name}" for name, _, _ in commands]
    see_also = ", ".join(f"{p}({SECTION})" for p in pages)
    tools = "qemu-nbd(8), qemu-storage-daemon(1), nbdinfo(1), qemu-img(1)"

    for name, summary, sub in commands:
        page = f"fleeced-{name}"
        if not sub.description:
            sub.description = summary[:1].upper() + summary[1:] + "."
        sections = [("SEE ALSO", f"fleeced({SECTION}), {tools}")]
        if name == "serve":
            sections.insert(0, ("FILES", FILES))
        (out / f"{page}.{SECTION}").write_text(_render(sub, page, summary, sections))

    summary = "NBD server with fleecing (copy-before-write) snapshots"
    sections = [("FILES", FILES), ("SEE ALSO", f"{see_also}, {tools}")]
    (out / f"fleeced.{SECTION}").write_text(_render(parser, "fleeced", summary, sections))
    print(f"manpages: fleeced.{SECTION} and {len(pages)} command pages in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
