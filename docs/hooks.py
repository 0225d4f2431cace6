"""MkDocs hook: pages rendered at build time, so they cannot drift from their source: the home page is the
README (its `docs/...` links made relative to the site), the reference pages come from the code
(raydllm.cli.reference)."""
from pathlib import Path

from mkdocs.structure.files import File

from raydllm.cli.reference import PAGES

README = Path(__file__).resolve().parents[1] / "README.md"


def on_files(files, config):
    home = README.read_text().replace("](docs/", "](")
    files.append(File.generated(config, "index.md", content=home))
    for path, render in PAGES.items():
        files.append(File.generated(config, path, content=render()))
    return files
