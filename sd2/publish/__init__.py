"""`sd2 publish`: a Hub-ready drafter folder (weights, config, tokenizer, sparsity.json, model card),
optionally uploaded to the Hugging Face Hub. See docs/publish.md.

    select.py      which drafter (--drafter, or the run's report's own best)
    provenance.py  base model and license
    untrim.py      full-vocabulary equivalent of a trimmed-vocabulary drafter
    export.py      the folder, built in a temporary place and moved in when complete
    card.py        README.md
    upload.py      create_repo + upload_folder, errors, clean-up
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sd2.core.errors import Sd2Error
from sd2.core.paths import expand
from sd2.publish import card, export, upload
from sd2.publish.provenance import front_matter, provenance
from sd2.publish.select import select

log = logging.getLogger("sd2")


@dataclass
class Published:
    drafter: str
    why: str
    folder: Path | None        # the exported folder, when kept (--out)
    files: list[str]
    url: str | None = None     # set when uploaded
    created: bool = False


def publish(source: Path, repo_id: str, drafter: str | None = None, private: bool = False, dry_run: bool = False,
            out: Path | None = None, exist_ok: bool = False, say=print) -> Published:
    """Build the folder for the chosen drafter; upload it unless ``dry_run``. ``say`` gets progress lines."""
    if dry_run and out is None:
        raise Sd2Error("--dry-run needs --out DIR: the folder that would be uploaded is written there")
    upload.check_repo_id(repo_id)
    if out is not None:  # before any model loads (a trimmed drafter is loaded to untrim it)
        from sd2.core.artifacts import writable_dir

        writable_dir(expand(out).parent, f"--out {out}: its parent folder")
    if not dry_run:
        upload.get_token()  # fail before any work when there is no token
    if is_export(Path(source)):
        if dry_run or drafter is not None:
            raise Sd2Error(f"{source} is already a folder built by sd2 publish; upload it with "
                           f"`sd2 publish {source} --repo-id {repo_id}` (no --dry-run, no --drafter)")
        say(f"{source} was built by sd2 publish: uploading it as is")
        up = upload.upload(Path(source), repo_id, private=private, exist_ok=exist_ok)
        say(f"uploaded to {up.url}" + (" (new repo)" if up.created else " (new commit on the existing repo)"))
        return Published(Path(source).name, "a folder built by sd2 publish", Path(source),
                         sorted(p.name for p in Path(source).iterdir()), up.url, up.created)
    sel = select(Path(source), drafter)
    say(f"drafter: {sel.name}: {sel.why}")
    target_ref = sel.report.target.loadable if sel.report is not None else None
    prov = provenance(sel.recipe, sel.model_dir, target_ref)

    def render(exp):
        return card.render(sel, prov, exp, repo_id)

    scratch = None
    dest = Path(out) if out is not None else None
    if dest is None:
        scratch = Path(tempfile.mkdtemp(prefix="sd2-publish-"))
        dest = scratch / repo_id.split("/")[-1]
    try:
        exp = export.build(sel, dest, render, prov.target)
        say(f"folder: {dest} ({', '.join(exp.files)})")
        if exp.untrimmed:
            say(f"trimmed vocabulary ({exp.untrimmed['draft_vocab_size']} of {exp.untrimmed['full_vocab_size']} tokens) "
                f"exported as its full-vocabulary equivalent; see the card's Vocabulary section")
        for note in exp.notes + prov.notes:
            say(f"note: {note}")
        result = Published(sel.name, sel.why, None if scratch else dest, exp.files)
        if dry_run:
            say(f"dry run: nothing uploaded; `sd2 publish {dest} --repo-id {repo_id}` uploads this folder as is")
            return result
        up = upload.upload(dest, repo_id, private=private, exist_ok=exist_ok)
        result.url, result.created = up.url, up.created
        say(f"uploaded to {up.url}" + (" (new repo)" if up.created else " (new commit on the existing repo)"))
        return result
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def is_export(folder: Path) -> bool:
    """A folder that sd2 publish built: its README front matter carries the sd2 tag."""
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    tags = front_matter(readme.read_text(errors="replace")).get("tags") or []
    return card.TAGS[2] in tags and "speculative-decoding" in tags
