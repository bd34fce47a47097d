"""``hfcompress push DIR REPO_ID [--private] [--revision REV]``: upload a saved checkpoint
(compressed model or adapter) to the Hub, safetensors only."""

from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a saved checkpoint directory to the Hub")
    p.add_argument("path", help="checkpoint directory (written by save_pretrained / hfcompress quantize)")
    p.add_argument("repo_id", help="Hub repository id, 'name' or 'namespace/name' (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.set_defaults(func=run)


def run(args) -> int:
    from hfcompress import hub

    if not os.path.isdir(args.path):
        raise FileNotFoundError(f"{args.path} is not a directory; pass the folder save_pretrained wrote")
    readme = os.path.join(args.path, "README.md")
    if not hub.is_generated_card(readme):
        if os.path.isfile(os.path.join(args.path, "config.json")):
            hub.write_card_(args.path, args.path)  # from the safetensors headers; a hand-written card is kept
            print(f"hfcompress push: wrote the model card {readme}", file=sys.stderr)
        else:
            print(f"hfcompress push: warning: {args.path} has no hfcompress model card (README.md); save the "
                  "adapter with save_pretrained after `import hfcompress` to write one", file=sys.stderr)
    info = hub.push_folder(args.path, args.repo_id, private=args.private or None, revision=args.revision,
                           commit_message=args.commit_message, create_pr=args.create_pr)
    print(f"pushed {args.path} to {info.repo_url.repo_id}"
          f"{'@' + args.revision if args.revision else ''}: {info.pr_url or info.commit_url}")
    return 0
