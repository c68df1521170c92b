"""`surgical-peft push ADAPTER_DIR REPO_ID`: upload a saved adapter, its model card included, to the Hub."""

from __future__ import annotations

import argparse

__all__ = ["COMMAND"]


class Push:
    help = "upload a saved adapter (with its model card) to the Hugging Face Hub"
    description = (
        "Upload an adapter directory as it was saved (a run's <output-dir>/adapter, or any save_pretrained of a\n"
        "surgical adapter) to a Hub repository, created if needed, in one commit: its adapter_config.json, weights\n"
        "and README.md model card. The Hub and a token with write access are checked first ('hf auth login' or\n"
        "HF_TOKEN); offline (HF_HUB_OFFLINE=1) or without network it stops at once with exit status 2.\n"
        "This is how to push later what 'surgical-peft train --push-to-hub' could not."
    )
    epilog = (
        "examples:\n"
        "  surgical-peft push outputs/demo-resnet-digits-contrast-stage1-seed0/adapter me/resnet-stage1-contrast\n"
        "  surgical-peft push ./adapter my-adapter --private"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the directory the adapter was saved in")
        parser.add_argument(
            "repo_id", metavar="REPO_ID", help="the Hub repository: 'owner/name', or 'name' in your namespace"
        )
        parser.add_argument("--private", action="store_true", help="create the repository as private (if new)")
        parser.add_argument("--commit-message", help="the commit's message")

    def run(self, args: argparse.Namespace) -> None:
        from ...hub import saved_adapter_directory
        from ..hub import check_hub, push_saved

        saved_adapter_directory(args.adapter_dir)  # (checked before the Hub is asked)
        repo_id = check_hub(args.repo_id)
        url = push_saved(args.adapter_dir, repo_id, private=args.private or None, commit_message=args.commit_message)
        print(f"Pushed {args.adapter_dir} to the Hub: {url}")


COMMAND = Push()
