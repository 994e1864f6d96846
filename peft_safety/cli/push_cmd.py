"""``peft-safety push MASK_DIR REPO_ID``: upload a mask folder to the Hugging Face Hub, with a model card.

A repository that already has a card (an adapter's, for instance) keeps it: the card is updated to describe the
adapter and the mask together (see ``docs/hub.md``).

Examples:

```bash
peft-safety push ./my-mask me/llama-snip-mask --private
peft-safety push ./my-mask me/llama-snip-mask --create-pr --commit-message "Mask from 512 AdvBench prompts"
peft-safety push ./my-mask me/llama-spa-lora --subfolder mask --mode SPA
```
"""

from __future__ import annotations

import argparse

from ..errors import SafetyFileNotFoundError

HELP = "upload a mask folder (safety_mask.safetensors) to the Hugging Face Hub with a model card"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mask_dir", metavar="MASK_DIR", help="folder holding safety_mask.safetensors (or the file)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="target model repository, e.g. me/llama-snip-mask")
    parser.add_argument("--commit-message", default="Upload safety mask", help="commit message")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--base-model", default=None, help="base model id for the card (default: from provenance)")
    parser.add_argument("--token", default=None, help="Hub token (default: cached login or HF_TOKEN)")
    parser.add_argument(
        "--subfolder", default=None, help="folder inside the repository for the mask, e.g. 'mask' next to an adapter"
    )
    parser.add_argument("--mode", default=None, help="SET or SPA, for the card (default: from the adapter's files)")


def run(args: argparse.Namespace) -> int:
    import os

    from peft_safety.mask import SafetyMask
    from peft_safety.mask.hub import push_mask_to_hub

    if not os.path.exists(args.mask_dir):
        raise SafetyFileNotFoundError(f"No such mask folder or file: {args.mask_dir!r}")
    mask = SafetyMask.from_pretrained(args.mask_dir)
    info = push_mask_to_hub(
        mask,
        args.repo_id,
        commit_message=args.commit_message,
        private=args.private,
        token=args.token,
        revision=args.revision,
        create_pr=args.create_pr,
        base_model=args.base_model,
        subfolder=args.subfolder,
        mode=args.mode,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed {mask!r} to {args.repo_id}: {url}")
    return 0
