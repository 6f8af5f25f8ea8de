"""mkdocs hook: the figures the pages show live in examples/figures/ (outside docs/), linked as
``../examples/figures/<name>.png`` so that the links work on GitHub too. This adds them to the
site under ``figures/`` and lets mkdocs resolve those links (and check them under --strict)."""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File, InclusionLevel

FIGURES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "figures"


def on_files(files, config):
    for png in sorted(FIGURES.glob("*.png")):
        f = File.generated(config, f"../examples/figures/{png.name}", abs_src_path=str(png),
                           inclusion=InclusionLevel.INCLUDED)
        f.dest_uri = f"figures/{png.name}"
        files.append(f)
    return files
