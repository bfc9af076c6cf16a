"""A self-contained Hub folder: the remote code files flat beside ``config.json`` and a complete ``auto_map``.

Shared by the models of this project (the sparse cross-encoder of Schlatt et al., ECIR 2024, and the MixEncoder);
every Hub folder carries a copy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr")


def finish_hub_folder(folder: str | Path, files: Iterable[Path], auto_map: dict[str, str]) -> None:
    """Copy ``files`` flat into ``folder`` and put ``auto_map`` into its ``config.json``.

    A config class loaded as remote code is saved by transformers' ``custom_object_save``, which sets its
    ``AutoConfig`` entry to the module that defines it; writing ``auto_map`` afterwards restores the complete map.
    """
    folder = Path(folder)
    for path in files:
        target = folder / path.name
        if target.resolve() != path:
            shutil.copyfile(path, target)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("auto_map") != auto_map:
        config["auto_map"] = dict(auto_map)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class HubFolderMixin:
    """``save_pretrained`` that writes a self-contained Hub folder, and pushes only the finished folder.

    Subclasses set ``hub_auto_map`` and ``hub_code_files``. transformers' own ``save_pretrained(push_to_hub=True)``
    would upload before the code files are copied, so the push is taken over and made after ``finish_hub_folder``.
    A class loaded as remote code has ``_auto_class`` set, so transformers' ``custom_object_save`` also runs: it copies
    the (flat) sibling files and rewrites one ``auto_map`` entry, which ``finish_hub_folder`` restores.
    """

    hub_auto_map: ClassVar[dict[str, str]] = {}

    def hub_code_files(self) -> list[Path]:
        raise NotImplementedError

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save weights and config, and copy the remote code flat beside them with a complete ``auto_map``."""
        push = kwargs.pop("push_to_hub", False)
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        self.config.auto_map = dict(self.hub_auto_map)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            finish_hub_folder(save_directory, self.hub_code_files(), self.hub_auto_map)
            if push:
                self.push_to_hub(hub_kwargs.pop("repo_id", Path(save_directory).name), **hub_kwargs)
