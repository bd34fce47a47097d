"""``hfcompress push DIR REPO_ID [--base-model ID] [--license L] [--private] [--revision REV]``:
upload a saved checkpoint (compressed model or adapter) to the Hub, safetensors only; its card's
usage snippet names REPO_ID."""

from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a saved checkpoint directory to the Hub")
    p.add_argument("path", help="checkpoint directory (written by save_pretrained / hfcompress quantize)")
    p.add_argument("repo_id", help="Hub repository id, 'name' or 'namespace/name' (created if missing)")
    p.add_argument("--base-model", default=None, metavar="HUB_ID",
                   help="the model this one was made from, for the card's base_model (default: what the card "
                        "already says, read from the source checkpoint when it was known)")
    p.add_argument("--license", default=None,
                   help="license id for the card, e.g. apache-2.0 (default: the base model's, when its card is known)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to, created from main if missing (default: main)")
    p.add_argument("--commit-message", default=None, help="commit message (default: 'Upload hfcompress checkpoint')")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.set_defaults(func=run)


def run(args) -> int:
    from huggingface_hub import HfApi

    from hfcompress import hub

    if not os.path.isdir(args.path):
        raise FileNotFoundError(f"{args.path!r}: no such directory; pass the folder save_pretrained wrote")
    is_model = os.path.isfile(os.path.join(args.path, "config.json"))
    if not is_model and not os.path.isfile(os.path.join(args.path, "adapter_config.json")):
        raise FileNotFoundError(f"{args.path!r} has no config.json or adapter_config.json; pass the folder "
                                "save_pretrained wrote")
    repo_id = HfApi().create_repo(args.repo_id, private=args.private or None, exist_ok=True).repo_id
    readme = os.path.join(args.path, "README.md")
    fields = {k: v for k, v in (("base_model", args.base_model), ("license", args.license)) if v}
    if hub.is_generated_card(readme):
        hub.update_card_(readme, repo_id=repo_id, **fields)
    elif is_model:
        hub.write_card_(args.path, args.path, {"repo_id": repo_id, **fields})  # a hand-written card is kept
        print(f"hfcompress push: wrote the model card {readme}", file=sys.stderr)
    else:
        print(f"hfcompress push: warning: {args.path} has no hfcompress model card (README.md); save the "
              "adapter with save_pretrained after `import hfcompress` to write one", file=sys.stderr)
    info = hub.push_folder(args.path, repo_id, private=args.private or None, revision=args.revision,
                           commit_message=args.commit_message, create_pr=args.create_pr, create=False)
    print(f"pushed {args.path} to {repo_id}{'@' + args.revision if args.revision else ''}: "
          f"{info.pr_url or info.commit_url}")
    return 0
