"""Find a checkpoint (Hub id or local directory) and read its configs, without loading any tensor.

Every layout in the wild holds the tower under one prefix: `vision_model.` (SigLIP repos), none (a
`SiglipVisionModel` saved by transformers 5), `vision_tower.vision_model.` (PaliGemma) or
`model.vision_tower.vision_model.` (newer PaliGemma saves). We find it as whatever stands in front of
`embeddings.patch_embedding.weight`; `weights` strips it and loads the tensors strictly.

The weights are safetensors files or, where a checkpoint has none, PyTorch pickles (`pytorch_model.bin`), read as
transformers 5 reads them: through torch's restricted unpickler, which builds tensors and nothing that could run code.

No torch at the top (safetensors lists the keys through numpy; a pickle imports it where it is read): `siglip embed`'s
head start (`headstart`) reads the preprocessing before torch is imported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import socket
import stat
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from safetensors import SafetensorError, safe_open

from .config import (
    PRESETS,
    ConfigError,
    PreprocessConfig,
    VisionConfig,
    preprocess_config_from_hub,
    vision_config_from_hub,
)
from .errors import UserError, first_line
from .text import display_path

if TYPE_CHECKING:
    from torch import Tensor

ANCHOR = "embeddings.patch_embedding.weight"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILE, PICKLE_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
# The weights transformers 5 looks for, in its order: safetensors whenever there are any, and of each format the single
# file before the index (a checkpoint re-saved unsharded in place keeps the old index, and perhaps its shards).
WEIGHT_FILES = ((SINGLE_FILE, INDEX_FILE), (PICKLE_FILE, PICKLE_INDEX_FILE))
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HUB_PROBE_SECONDS = 3.0
LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # what `git clone` without git-lfs leaves instead


class CheckpointError(UserError):
    """A checkpoint that cannot be found, read, or matched to the model."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its configs and the files (safetensors or PyTorch pickles) with its vision tensors."""

    name: str  # as the user gave it
    revision: str | None  # the Hub commit hash; None for a local directory
    vision: VisionConfig
    preprocess: PreprocessConfig
    weight_files: tuple[Path, ...]
    prefix: str  # what stands in front of the tower's parameter names in those files
    # Where `preprocess` came from: "preprocessor_config.json", "processor_config.json" (transformers 5 saves a
    # processor's parts there together), or "" when the checkpoint has neither and SigLIP's defaults were assumed.
    preprocess_source: str


def resolve_checkpoint(name: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Resolve `name` (a local directory in the Hub layout, or a Hub id) without loading any tensor."""
    name = os.fsdecode(name)  # a pathlib.Path from a Python caller
    if not name.strip():  # `-m "$MODEL"` with the variable unset: Path("") is the current folder
        raise CheckpointError("the model name is empty: give a Hub id or a checkpoint directory.")
    path = Path(name).expanduser()
    kind = _kind(path, name)
    if kind == "folder":
        if revision is not None:
            raise CheckpointError(f"{name} is a local folder: a revision ({revision}) applies only to Hub ids.")
        return _resolve(name, None, _LocalFiles(path))
    if kind == "file":  # model.safetensors or pytorch_model.bin alone: the tower's shape is in config.json
        raise CheckpointError(f"{name} is a file; pass the checkpoint directory that holds config.json instead.")
    if name in PRESETS:
        raise CheckpointError(
            f"{name} is an architecture preset without weights; to embed with its weights use --model google/{name}."
        )
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:  # a path: no Hub id looks so
        raise CheckpointError(f"there is no folder {name}: give a checkpoint directory or a Hub id (org/name).")
    if "/" not in name:
        raise CheckpointError(f"{name} is neither a local checkpoint directory nor a Hub id of the form org/name.")
    try:
        return _resolve(name, revision, _HubFiles(name, revision))
    except CheckpointError as e:
        if os.path.isdir(path.parent):  # `runs/ckpt-final` mistyped looks like a Hub id: say the folder is not there
            raise CheckpointError(f"there is no folder {name} here, and as a Hub id, {e}") from None
        raise


def local_preprocessing(name: str, revision: str | None = None) -> PreprocessConfig | None:
    """The preprocessing `resolve_checkpoint` would read for `name`, from this machine only (a folder, or the Hub's
    cache), for the head start, which must not wait on the network; None where it is not at hand, or fails."""
    try:
        path = Path(name).expanduser()
        files = _LocalFiles(path) if path.is_dir() else _HubFiles(name, revision, cache_only=True)
        return _configs(name, files)[2]
    except Exception:  # noqa: BLE001 - the run resolves the checkpoint itself, and says what is wrong with it
        return None


def _configs(name: str, files: _LocalFiles | _HubFiles) -> tuple[dict, VisionConfig, PreprocessConfig, str]:
    """The checkpoint's config.json, its tower and preprocessing, and the file the preprocessing came from; a
    ConfigError or CheckpointError, naming `name`, for a config that cannot be used."""
    config = _read_config(name, files)
    preprocessor, preprocess_source = _image_processor_config(files)
    source = "config.json"
    try:
        vision = vision_config_from_hub(config)
        source = preprocess_source or source
        preprocess = preprocess_config_from_hub(preprocessor, vision)
    except ConfigError as e:  # the same sentence, naming the checkpoint and its file
        raise ConfigError(f"{name}: {e}" if source in str(e) else f"{name}/{source}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value of the wrong kind the checks missed
        files_read = f"config.json or {preprocess_source}" if preprocess_source else "config.json"
        raise CheckpointError(f"{name}: {files_read} holds a malformed value ({e}).") from None
    sized = preprocess.do_resize or preprocess.center_crop  # else each image must come at its size (preprocess.py)
    if sized and vision.dropped_from(preprocess.height, preprocess.width) is None:
        step = "crops" if preprocess.center_crop else "resizes"
        p, g = vision.patch_size, vision.grid_size
        raise CheckpointError(
            f"{name}: {preprocess_source} {step} to {preprocess.width}×{preprocess.height}, a "
            f"{preprocess.width // p}×{preprocess.height // p} grid of {p} px patches, but the tower takes "
            f"{vision.image_size}×{vision.image_size} images ({g}×{g} patches)."
        )
    return config, vision, preprocess, preprocess_source


def _read_config(name: str, files: _LocalFiles | _HubFiles) -> dict:
    """config.json. Its absence from an OpenCLIP checkpoint (the `timm/ViT-B-16-SigLIP` repos: timm's tensor names,
    open_clip_config.json) is said as such, with the way out: the transformers repo of the same model."""
    try:
        path = files.get("config.json", required=True)
    except CheckpointError:
        if files.get("open_clip_config.json", required=False, probe=False) is None:
            raise
        raise CheckpointError(
            f"{name} is an OpenCLIP checkpoint (open_clip_config.json, timm's tensor names), not the transformers "
            "layout siglip reads (config.json): use the transformers repo of the same model, such as "
            "google/siglip-base-patch16-224 for timm/ViT-B-16-SigLIP."
        ) from None
    return _read_json(path)  # one that cannot be read says so, OpenCLIP's file beside it or not


def _resolve(name: str, revision: str | None, files: _LocalFiles | _HubFiles) -> Checkpoint:
    config, vision, preprocess, preprocess_source = _configs(name, files)
    prefix, weight_files, keys = _weights(name, files)
    fields = config.get("vision_config")
    if config.get("model_type") == "paligemma" and isinstance(fields, dict) and "vision_use_head" not in fields:
        # PaliGemma's own towers say `vision_use_head: false`; a vision_config silent on it gets a head from
        # transformers (SiglipVisionConfig's default), random if the weights hold none. We follow the weights.
        vision = dataclasses.replace(vision, vision_use_head=any(key.startswith(prefix + "head.") for key in keys))
    return Checkpoint(name, files.commit_hash or revision, vision, preprocess, weight_files, prefix, preprocess_source)


def _weights(name: str, files: _LocalFiles | _HubFiles) -> tuple[str, tuple[Path, ...], list[str]]:
    """The tower's prefix, the files that hold its tensors (of a sharded checkpoint, only the shards with some), and
    the names of every tensor in the checkpoint: from the first of `WEIGHT_FILES` it has. Offline, that is the first
    the cache holds, as transformers takes it: a cached pickle where the cache holds no safetensors."""
    not_cached = None  # files the cache lacks and the Hub could not be asked about: not "there are none"
    for single_name, index_name in WEIGHT_FILES:
        single = files.get(single_name, required=False)
        if single is not None:
            with open_weights(single) as f:
                keys = list(f.keys())
            return _find_prefix(name, keys), (single,), keys
        index_path = files.get(index_name, required=False)
        if index_path is not None:
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no weight_map naming the shard of each tensor.")
            keys = list(weight_map)
            prefix = _find_prefix(name, keys)
            shards = sorted({shard for key, shard in weight_map.items() if key.startswith(prefix)})
            return prefix, tuple(files.get(shard, required=True) for shard in shards), keys
        not_cached = not_cached or files.unknown.get(single_name) or files.unknown.get(index_name)
    if not_cached is not None:
        raise not_cached
    wanted = [filename for pair in WEIGHT_FILES for filename in pair]
    raise CheckpointError(f"{name} has no {', '.join(wanted[:-1])} or {wanted[-1]}.")


def _image_processor_config(files: _LocalFiles | _HubFiles) -> tuple[dict | None, str]:
    """The image processor's settings and the file they came from, in transformers 5's order: the
    `image_processor` entry of `processor_config.json` (what its `SiglipProcessor.save_pretrained` writes), else
    `preprocessor_config.json`, else (None, ""). A folder can hold both, the older file left from a download that
    was saved over: transformers then reads the first, and so must we, or the pixels differ silently."""
    path = files.get("processor_config.json", required=False, probe=False)
    if "processor_config.json" in files.unknown:  # the Hub failed on it: it may hold the settings that count
        raise files.unknown["processor_config.json"]
    if path is not None:
        entry = _read_json(path).get("image_processor")
        if entry is not None:
            if not isinstance(entry, dict):
                raise CheckpointError(f"{path}: its image_processor entry is not a JSON object.")
            return entry, path.name
    path = files.get("preprocessor_config.json", required=False)
    if path is not None:
        return _read_json(path), path.name
    if "preprocessor_config.json" in files.unknown:  # SigLIP's defaults would be a guess: the repo may have one
        raise files.unknown["preprocessor_config.json"]
    return None, ""


def _find_prefix(name: str, keys) -> str:
    prefixes = sorted({key[: -len(ANCHOR)] for key in keys if key.endswith(ANCHOR)})
    if not prefixes:
        raise CheckpointError(f"{name} holds no SigLIP vision tower: no tensor named '*{ANCHOR}'.")
    if len(prefixes) > 1:
        raise CheckpointError(f"{name} holds several vision towers ({', '.join(p or '<none>' for p in prefixes)}).")
    return prefixes[0]


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e  # not "[Errno 13] ...: 'config.json'"
        raise CheckpointError(f"cannot read {path}: {reason}.") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} is not a JSON object.")
    return content


def _is_utf8(path: str) -> bool:
    """Whether the path's bytes are valid UTF-8 (what safetensors, a Rust library, can open)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@contextmanager
def open_weights(path: Path, *, framework: str = "numpy") -> Iterator:
    """`safe_open` whose failures, while opening or reading tensors, are one sentence naming the file; for a PyTorch
    pickle (any other name than *.safetensors, as transformers tells them apart), an object that reads as safe_open's
    does: `keys()`, `get_tensor(key)`. The keys of a safetensors file need no framework: "numpy" does not import
    torch, which "pt" does; a pickle's tensors are torch's whatever the framework."""
    safetensors = path.name.endswith(".safetensors")
    if not _is_utf8(str(path)):  # both read the path in Rust or C++, which take only UTF-8
        library = "safetensors" if safetensors else "torch"
        raise CheckpointError(
            f"{display_path(str(path))}: {library} cannot open a path that is not valid UTF-8; rename the folder."
        )
    if not safetensors:
        yield _PickledWeights(_load_pickle(path))
        return
    try:
        with safe_open(path, framework=framework) as f:
            yield f
    except (SafetensorError, OSError) as e:
        # safetensors says "No such file or directory" of a file it may not read: the system's reason first.
        raise _unreadable(path) or CheckpointError(
            f"{path} is not a readable safetensors file (damaged or incomplete download): {e}."
        ) from None


def _load_pickle(path: Path) -> dict[str, Tensor]:
    """The tensors of a PyTorch pickle (`pytorch_model.bin`) by name, as transformers 5 loads them: through torch's
    restricted unpickler (`weights_only=True`), which builds tensors and plain containers and refuses to call
    anything else, so the file cannot run code; memory-mapped where the file is in torch's zip format (torch ≥ 1.6),
    so a tensor is read from disk only when used. A file that is not such a checkpoint is one sentence naming it."""
    import torch  # here: the head start imports this module before torch

    try:
        with warnings.catch_warnings():  # of a pickle newer than torch writes: it either loads or is one sentence
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - a damaged file fails in torch.load as RuntimeError, EOFError, KeyError...
        raise _unreadable(path) or _refused_pickle(path, e) from None
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise CheckpointError(f"{path} is not a plain tensor checkpoint: it holds a {kind}, not tensors by name.")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path} is not a plain tensor checkpoint: its entry {key!r} is not a tensor ({type(value).__name__})."
            )
    return state


class _PickledWeights:
    """A PyTorch pickle's tensors, read as `safe_open` reads a safetensors file."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_tensor(self, key: str) -> Tensor:
        # A copy, out of the file's memory map: a fine-tune saving over the file (torch.save truncates it first) would
        # pull the pages from under the loaded model, and the run would die of SIGBUS.
        return self.tensors[key].clone()


def _refused_pickle(path: Path, error: Exception) -> CheckpointError:
    """The sentence for a pickle `torch.load(weights_only=True)` did not load: one it refused (it would call
    something other than what tensors are built with, or uses an instruction it does not read), or one damaged."""
    if isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed"):
        called = re.search(r"GLOBAL ([\w.]+)", str(error))
        if called:
            return CheckpointError(
                f"{path} is not a plain tensor checkpoint: its pickle calls {called[1]}, which torch's weights-only "
                "loader refuses since it could run any code."
            )
        # torch's reason follows "WeightsUnpickler error:", on the same line or the next that has any.
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        return CheckpointError(
            f"{path} is not a plain tensor checkpoint: torch's weights-only loader cannot read it"
            + (f" ({reason[1].strip()})." if reason else ".")
        )
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint (damaged or incomplete download): "
        f"{first_line(error).rstrip('.')}."
    )


def _unreadable(path: Path) -> CheckpointError | None:
    """Why a weights file that failed to load cannot be read at all, where that is the reason: the system's (no
    permission), or a Git LFS pointer where the file should be; None for a file that reads."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(LFS_POINTER))
    except OSError as unreadable:
        return CheckpointError(f"cannot read {path}: {unreadable.strerror}.")
    if start == LFS_POINTER:
        return CheckpointError(
            f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in the checkpoint folder."
        )
    return None


def _kind(path: Path, name: str) -> str | None:
    """What `path` is: "folder", "file" or None (nothing there); a CheckpointError naming `name` where this user may
    not look (a folder on its way without the x bit). Read from `os.stat`: pathlib's `is_dir` raises for that in
    Python 3.13 and earlier, and says False in 3.14, which would call a closed checkpoint one that is not there."""
    try:
        mode = os.stat(path).st_mode
    except PermissionError as e:
        raise CheckpointError(f"cannot read {display_path(str(name))}: {e.strerror}.") from None
    except (OSError, ValueError):  # not there, or not a name the system takes (a NUL, too long): not a local path
        return None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else None


class _LocalFiles:
    commit_hash = None

    def __init__(self, directory: Path):
        self.directory = directory
        self.unknown: dict[str, CheckpointError] = {}  # a folder knows what it holds: never filled

    def get(self, filename: str, *, required: bool, probe: bool = True) -> Path | None:
        """As `_HubFiles.get`, whose `probe` means nothing for a folder."""
        path = self.directory / filename
        if _kind(path, f"the folder {self.directory}") == "file":  # closed to this user: a CheckpointError
            return path
        if required:
            raise CheckpointError(f"{self.directory} has no {filename}.")
        return None


class _HubFiles:
    """Files of a Hub repo through huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN are honoured).

    Only the first request may go to the network: once config.json is in hand we pin its commit hash, and
    huggingface_hub serves files of a known commit straight from the cache. An offline user without
    HF_HUB_OFFLINE=1 therefore waits for one failed request, not one per file.

    An optional file can be absent (the Hub said so, now or in a past run) or unknown (not cached, and the Hub
    not reachable or failing). `get` returns None for both, since a sharded checkpoint lacks `model.safetensors`
    and a single-file one its index; the reason for an unknown one is kept in `unknown`, and raised where the file
    could have counted (`_weights` when it finds no other weights, `_image_processor_config`): "not in the cache
    and the Hub cannot be reached", not "the repo has no weights".
    """

    def __init__(self, repo_id: str, revision: str | None, *, cache_only: bool = False):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise CheckpointError(f"{repo_id!r} is not a valid Hub id.") from None
        self.repo_id, self.revision, self.commit_hash = repo_id, revision, None
        self.cache_only = cache_only  # never ask the Hub
        self.reachable: bool | None = None  # the Hub's host, once probed
        self.unknown: dict[str, CheckpointError] = {}

    def get(self, filename: str, *, required: bool, probe: bool = True) -> Path | None:
        """The file from the cache or the Hub. Without `probe`, an optional file that is not cached is looked for
        only if this run already knows the Hub is reachable: seldom-present files cost an offline run no wait."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub import errors as hub

        revision = self.commit_hash or self.revision
        cached = try_to_load_from_cache(self.repo_id, filename, revision=revision)
        if not isinstance(cached, str):
            if not probe and self.reachable is not True:
                return None
            if not self._can_ask():
                if cached is not None and not required:  # huggingface_hub's mark: the Hub said it has no such file
                    return None
                return self._unknown(filename, self._not_cached(filename), required=required)
        elif self.cache_only:  # as cached, unchecked: huggingface_hub would ask the Hub whether a branch moved
            return self._pinned(Path(cached))
        try:
            path = Path(hf_hub_download(self.repo_id, filename, revision=revision))
        except hub.GatedRepoError:
            raise CheckpointError(
                f"{self.repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN (or run `hf auth login`)."
            ) from None
        except hub.RepositoryNotFoundError:
            raise CheckpointError(
                f"{self.repo_id} was not found on the Hugging Face Hub (check the id, or set HF_TOKEN for a private repo)."
            ) from None
        except hub.RevisionNotFoundError:
            raise CheckpointError(f"{self.repo_id} has no revision {self.revision!r}.") from None
        except hub.LocalEntryNotFoundError as e:  # not cached, and the Hub did not answer or answered an error
            return self._unknown(filename, self._not_cached(filename, e.__cause__), required=required)
        except hub.EntryNotFoundError:
            if required:
                raise CheckpointError(f"{self.repo_id} has no file {filename}.") from None
            return None
        except Exception as e:  # noqa: BLE001 - the transfer itself failed; its errors come from several libraries
            # A connection dropped mid-file (the HTTP client's error, after huggingface_hub's own resumed tries),
            # a size check that failed, a full disk. huggingface_hub 2 drops the partial file: a rerun starts over.
            reason = first_line(e)
            raise CheckpointError(
                f"downloading {filename} of {self.repo_id} stopped ({reason}); run the command again to retry."
            ) from None
        return self._pinned(path)

    def _pinned(self, path: Path) -> Path:
        """`path`, a file of the cache's snapshot of a commit, which the repo's other files are then taken from."""
        if self.commit_hash is None and path.parent.parent.name == "snapshots":
            self.commit_hash = path.parent.name
        return path

    def _unknown(self, filename: str, error: CheckpointError, *, required: bool) -> None:
        if required:
            raise error
        self.unknown[filename] = error
        return None

    def _can_ask(self) -> bool:
        """Whether to ask the Hub for a file the cache lacks: not under HF_HUB_OFFLINE, nor when the Hub's host
        refuses a connection within seconds.

        huggingface_hub alone would retry a file it does not hold for about 26 s, five warnings long, even when
        the host name does not resolve: an offline machine would wait that long for the optional shard index of a
        single-file model, or print it all before the one sentence that says what to do. Through a proxy we
        cannot tell: ask.
        """
        from huggingface_hub import constants

        if self.cache_only or constants.HF_HUB_OFFLINE:
            return False
        if any(os.environ.get(name) for name in PROXY_VARIABLES):
            return True
        if self.reachable is None:  # one probe a run
            endpoint = urlsplit(constants.ENDPOINT)
            try:
                port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
                with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS):
                    self.reachable = True
            except (OSError, ValueError):
                self.reachable = False
        return self.reachable

    def _not_cached(self, filename: str, cause: BaseException | None = None) -> CheckpointError:
        """The sentence for a file neither cached nor fetched, naming the file once part of the repo is cached
        (a first download stopped halfway), and why the Hub could not give it."""
        from huggingface_hub import constants

        what = self.repo_id if self.revision is None else f"{self.repo_id} at revision {self.revision!r}"
        if self.commit_hash is not None:
            what = f"{filename} of {what}"
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if constants.HF_HUB_OFFLINE:
            why, advice = "HF_HUB_OFFLINE is set", "unset it to download it"
        elif status is not None and (status >= 500 or status == 429):  # an outage, or too many requests
            why, advice = f"the Hub answered HTTP {status}", "try again later"
        elif status is not None:  # refused: a token without access, or a proxy or firewall on the way
            why, advice = f"the Hub answered HTTP {status}", "check HF_TOKEN and any proxy or firewall"
        else:
            why, advice = "the Hub cannot be reached", "connect once to download it"
        return CheckpointError(
            f"{what} is not in the local Hugging Face cache and {why}: {advice}, or pass a local checkpoint "
            "directory with --model."
        )
