"""A self-contained Hub folder: the remote code files flat beside ``config.json`` and a complete ``auto_map``.

Shared by the models of this project (the sparse cross-encoder of Schlatt et al., ECIR 2024, and the MixEncoder);
every Hub folder carries a copy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path


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
